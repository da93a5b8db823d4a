"""Test helpers: real redis-server and hub processes on free loopback ports; an SSE reader on the project's parser."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from hub.sse import SSEEvent, SSEParser
from producer.jobs import GenerationRecord, JobQueue

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s}s")


class RedisServer:
    """A redis-server process of the test's own, on a free port; it can be stopped and started again."""

    def __init__(self, *extra: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.exe = exe
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hub-test-redis-")
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ServiceProcess:
    """A real `python -m <module>` process (hub or producer) with its output in a log file."""

    module = ""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"{self.module}-test-", suffix=".log")[1])

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_path.unlink(missing_ok=True)


class HubProcess(ServiceProcess):
    """A real `python -m hub` process on a free port (anonymous unless the test configures authentication)."""

    module = "hub"

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env={"HUB_ANONYMOUS": "1", **(env or {})})
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [*super().command(), "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self) -> None:
        super().start()
        _wait_port(self.port, 20, self.proc)


class ProducerProcess(ServiceProcess):
    """A real `python -m producer` worker process."""

    module = "producer"


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[SSEEvent]:
    """The events of an SSE response, as the project's WHATWG parser reads them, until the response ends."""
    parser = SSEParser()
    async for chunk in resp.content.iter_any():
        for ev in parser.feed(chunk):
            yield ev


async def collect(resp: aiohttp.ClientResponse, *, count: int | None = None, timeout_s: float = 10) -> list[SSEEvent]:
    """Read events until `count` arrived or the response ended (count None), within `timeout_s`."""
    out: list[SSEEvent] = []
    async with asyncio.timeout(timeout_s):
        async for ev in read_events(resp):
            out.append(ev)
            if count is not None and len(out) >= count:
                break
    return out


async def settled(queue: JobQueue, job_id: str, timeout_s: float = 10) -> GenerationRecord:
    """A generation's final record. The worker settles it just after appending the end marker, so a reader who saw
    the channel close may still find it running for a moment."""
    deadline = time.monotonic() + timeout_s
    while (record := await queue.get(job_id)) is None or record.status in ("queued", "running"):
        assert time.monotonic() < deadline, f"{job_id} not settled: {record}"
        await asyncio.sleep(0.02)
    return record
