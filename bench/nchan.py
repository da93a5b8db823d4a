"""nginx + Nchan from `bench/nchan.conf.template` on a loopback port: find the module Debian installs, render the
template into a temporary directory, start nginx (one worker, in the foreground), and stop it by PID.

Used by the comparison benchmark (bench/run.py) and by the Nchan smoke test (tests/loadtest/test_nchan.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.processes import Service, alive, children, wait_port

__all__ = ["TEMPLATE", "NchanServer", "find_module", "find_nginx", "missing", "render"]

TEMPLATE = Path(__file__).resolve().parent / "nchan.conf.template"
NCHAN_PACKAGE = "libnginx-mod-nchan"
# Where Debian puts it, for when dpkg itself is not there to ask.
_DEFAULT_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
DEFAULT_WORKER_CONNECTIONS = 16384
_START_TIMEOUT_S = 20.0


def find_nginx() -> str | None:
    """The nginx binary. It lives in /usr/sbin, which is not on an ordinary user's PATH on Debian."""
    exe = shutil.which("nginx")
    if exe is None and os.access("/usr/sbin/nginx", os.X_OK):
        exe = "/usr/sbin/nginx"
    return exe


def find_module() -> Path | None:
    """The Nchan dynamic module, as `dpkg -L libnginx-mod-nchan` lists it."""
    try:
        listed = subprocess.run(
            ["dpkg", "-L", NCHAN_PACKAGE], capture_output=True, text=True, timeout=30, check=False
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        listed = []
    for line in listed:
        if line.endswith("ngx_nchan_module.so") and Path(line).is_file():
            return Path(line)
    return _DEFAULT_MODULE if _DEFAULT_MODULE.is_file() else None


def missing() -> str | None:
    """Why nginx + Nchan cannot run here, or None when it can."""
    if find_nginx() is None:
        return "nginx is not installed (`make bench-deps` installs nginx and libnginx-mod-nchan)"
    if find_module() is None:
        return f"the Nchan module is not installed (`apt-get install {NCHAN_PACKAGE}`, or `make bench-deps`)"
    return None


def render(template: str, values: dict[str, str]) -> str:
    """Replace each `@NAME@` of the template; nginx's own `$variables` are left alone."""
    out = template
    for name, value in values.items():
        out = out.replace(f"@{name}@", value)
    if "@" in "".join(line.split("#", 1)[0] for line in out.splitlines()):
        raise ValueError(f"{TEMPLATE.name}: a placeholder was left unfilled")
    return out


class NchanServer:
    """nginx + Nchan with its files in a temporary directory of its own, listening on 127.0.0.1:`port`."""

    def __init__(self, port: int, *, worker_connections: int = DEFAULT_WORKER_CONNECTIONS) -> None:
        why = missing()
        if why is not None:
            raise RuntimeError(why)
        nginx, module = find_nginx(), find_module()
        assert nginx is not None and module is not None
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="nchan-"))
        # When started as root, nginx runs its worker as `nobody`: the worker must be able to enter this directory
        # (message bodies too large for memory go to the temp path in it).
        self.dir.chmod(0o755)
        conf = render(
            TEMPLATE.read_text(),
            {
                "MODULE": str(module),
                "DIR": str(self.dir),
                "PORT": str(port),
                "WORKER_CONNECTIONS": str(worker_connections),
                "NOFILE": str(worker_connections + 256),
            },
        )
        (self.dir / "nginx.conf").write_text(conf)
        self.master = Service(
            "nginx",
            [nginx, "-p", str(self.dir), "-e", str(self.dir / "error.log"), "-c", str(self.dir / "nginx.conf")],
            self.dir / "stdout.log",
            own_session=True,
        )
        self.worker_pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.master.start()
        assert self.master.proc is not None
        try:
            wait_port(self.port, _START_TIMEOUT_S, self.master.proc)
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not (workers := children(self.master.pid)):
                if time.monotonic() > deadline:
                    raise TimeoutError("nginx started no worker process")
                time.sleep(0.05)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"nginx + Nchan did not start: {e}\n{self.log_tail()}") from None
        # `worker_processes 1`: the one child is the process that serves every connection, and the one whose CPU and
        # memory are measured (the master only supervises).
        self.worker_pid = workers[0]

    def log_tail(self, lines: int = 20) -> str:
        parts = [self.master.log_tail(lines)]
        try:
            parts += (self.dir / "error.log").read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            pass
        return "\n".join(p for p in parts if p)

    def status(self) -> dict[str, str]:
        """Nchan's stub status (`total published messages`, `shared memory used`, `nchan version`, ...)."""
        with urllib.request.urlopen(f"{self.url}/nchan_status", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def close(self) -> None:
        """Stop nginx by the master's PID (SIGTERM, nginx's fast shutdown: a graceful one would wait for every
        open stream to end; then SIGKILL) and make sure the worker went with it: a worker outlives a killed master."""
        self.master.stop(signal.SIGTERM, timeout_s=10.0)
        worker = self.worker_pid
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
