"""Child processes for the tests and the benchmarks: free loopback ports, waiting for a listener, `Service` (a command
with its output in a log file, stopped by its PID within a deadline), `RedisServer`, and a look at a process's own
children in /proc. Standard library only, so `bench/*.py` import it too."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from signal import SIGTERM, Signals  # not the module: Service.signal would hide it in the class

__all__ = ["RedisServer", "Service", "alive", "children", "free_port", "stop_process", "wait_port"]


def free_port() -> int:
    """A loopback port nothing listens on now (another process could still take it before the caller does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout_s: float = 20, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`; fail at once if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s:g} s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10, sig: Signals = SIGTERM) -> None:
    """`sig` to this process only (never to a name or a group), then SIGKILL if it outlives `timeout_s`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def children(pid: int) -> list[int]:
    """The PIDs of a process's children (nginx's workers, say), from /proc; none once it has gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Whether a process that is not our child (we cannot wait for it) is still running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie has exited; only its parent's wait is missing.
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Service:
    """A child process with its output in a log file. With `own_session` it runs in a session of its own, so a
    Ctrl-C in the terminal reaches only its parent, which then stops each of its children in order, by PID."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        own_session: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = env  # None: this process's environment
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not started"
        return self.proc.pid

    def command(self) -> list[str]:
        """What `start` runs (subclasses build it then, from what they were told since)."""
        return self.argv

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: Signals) -> None:
        assert self.proc is not None, f"{self.name} is not started"
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None, f"{self.name} is not started"
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, sig: Signals = SIGTERM, timeout_s: float = 15.0) -> None:
        stop_process(self.proc, timeout_s, sig)


class RedisServer(Service):
    """A redis-server of its own on a free loopback port (never the default one, where another Redis may live),
    saving nothing; it can be stopped and started again. Its files go in `directory`, or in a temporary directory
    that `close` removes."""

    def __init__(self, *extra: str, directory: Path | None = None, own_session: bool = False) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (`make system-deps` installs it)")
        self._own_dir = directory is None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.dir = str(directory) if directory is not None else tempfile.mkdtemp(prefix="hub-redis-")
        super().__init__("redis-server", [exe], Path(self.dir) / "redis.log", own_session=own_session)
        self.port = free_port()
        assert self.port != 6379, "never the default Redis port"
        self.extra = extra
        self.config: str | None = None  # a configuration file, read first (a Sentinel needs one it can rewrite)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [*self.argv, *([self.config] if self.config else [])]
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        return [*args, "--dir", self.dir, *self.extra]

    def start(self) -> None:
        super().start()
        wait_port(self.port, 10, self.proc)

    def stop(self, sig: Signals = SIGTERM, timeout_s: float = 10.0) -> None:
        super().stop(sig, timeout_s)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
