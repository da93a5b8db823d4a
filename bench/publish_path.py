"""Publish path benchmark: what one publish costs the hub's process at a sparse rate, beside what any Python server on
uvloop pays for a request (a bare protocol answering 201) and what aiohttp alone pays (a handler that only reads the
body); and, under strace, the event loop's turns per publish: its polls that waited (wake-ups) and those that did not.

Each server is a process of its own, on a free loopback port; one client sends JSON bodies one at a time, paced at
each rate, on one keep-alive connection, as a producer does. CPU is user + system from /proc over the window, per
request; rounds take turns over the servers and the table shows medians. The hub runs on its own redis-server, with
0 and with 10 subscribers on the channel. Bounded; stops by itself. Prints a Markdown report (also written to --out).

    python bench/publish_path.py --rates 200 1000 --seconds 5 --rounds 3 --out bench/results-publish-path.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Report, cpu_seconds  # noqa: E402
from tests.processes import RedisServer, free_port, wait_port  # noqa: E402

_BODY = b'{"ids":["1-0"]}'
_EPOLL = re.compile(r"epoll_pwait\(\d+, .*?, \d+, (-?\d+),")


def _serve_raw(port: int) -> None:
    """The floor: a uvloop protocol that finds each request's end and answers 201, one task per request."""
    import uvloop

    response = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(_BODY),
        _BODY,
    )

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                length = 0
                for line in self.buffer[:end].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length :]
                self.answering = asyncio.get_running_loop().create_task(self.answer())  # a task per request

        async def answer(self) -> None:
            self.transport.write(response)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def _serve_aiohttp(port: int) -> None:
    """aiohttp alone: an application with one route whose handler reads the body and answers 201."""
    import uvloop
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=201, body=_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/channels/{channel}/events", handler)
    web.run_app(app, host="127.0.0.1", port=port, loop=uvloop.new_event_loop(), print=None, access_log=None)


class Server:
    """A server process under test, and how many subscribers watch the channel it is published to."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, subscribers: int = 0) -> None:
        self.name, self.proc, self.port, self.subscribers = name, proc, port, subscribers

    @classmethod
    def start(cls, name: str, command: list[str], port: int) -> Server:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, 30, proc)
        return cls(name, proc, port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/channels/bench{self.subscribers}/events"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


async def _publish(session: aiohttp.ClientSession, server: Server, rate: float, seconds: float) -> int:
    t0, n = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        async with session.post(server.url, json={"data": str(n)}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"{server.name}: {resp.status} {(await resp.text())[:200]}")
            await resp.read()
        n += 1
        await asyncio.sleep(max(0.0, t0 + n / rate - time.monotonic()))
    return n


async def _window(server: Server, rate: float, seconds: float) -> float:
    """CPU µs per publish over one paced window."""
    async with aiohttp.ClientSession() as session:
        streams = [await session.get(server.url) for _ in range(server.subscribers)]
        await asyncio.sleep(0.3)
        cpu0 = cpu_seconds(server.proc.pid)
        n = await _publish(session, server, rate, seconds)
        cpu = cpu_seconds(server.proc.pid) - cpu0
        for s in streams:
            s.close()
    return cpu / n * 1e6


async def _traced_window(server: Server, rate: float, seconds: float, size: Callable[[], int]) -> tuple[int, int, int]:
    """Publish with the subscribers connected: (the trace's size when publishing began, when it ended, publishes)."""
    async with aiohttp.ClientSession() as session:
        streams = [await session.get(server.url) for _ in range(server.subscribers)]
        await asyncio.sleep(0.3)
        mark = size()
        n = await _publish(session, server, rate, seconds)
        end = size()
        for s in streams:
            s.close()
    return mark, end, n


def _turns(server: Server, rate: float, seconds: float) -> tuple[float, float, float] | None:
    """Under strace: (polls that waited, polls that did not, reads) per publish; None without strace."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    out = Path(f"/tmp/bench-publish-path-{os.getpid()}.strace")
    trace = subprocess.Popen(
        [strace, "-f", "-e", "trace=epoll_pwait,epoll_wait,read", "-o", str(out), "-p", str(server.proc.pid)],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # strace attached

        def size() -> int:
            return out.stat().st_size if out.exists() else 0

        mark, end, n = asyncio.run(_traced_window(server, rate, seconds, size))
    finally:
        trace.send_signal(signal.SIGINT)
        trace.wait(10)
    with out.open("rb") as f:
        f.seek(mark)
        lines = f.read(end - mark).decode(errors="replace").splitlines()
    out.unlink(missing_ok=True)
    timeouts = [int(m.group(1)) for line in lines if (m := _EPOLL.search(line))]
    waited = sum(1 for t in timeouts if t != 0)
    reads = sum(1 for line in lines if " read(" in line or line.startswith("read("))
    return waited / n, (len(timeouts) - waited) / n, reads / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[200.0, 1000.0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", choices=("raw", "aiohttp"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.serve:
        (_serve_raw if args.serve == "raw" else _serve_aiohttp)(args.port)
        return
    report = Report([])
    redis = RedisServer()
    servers: list[Server] = []
    try:
        redis.start()
        here = [sys.executable, str(Path(__file__).resolve())]
        for name, serve in (("bare uvloop protocol", "raw"), ("bare aiohttp handler", "aiohttp")):
            port = free_port()
            servers.append(Server.start(name, [*here, "--serve", serve, "--port", str(port)], port))
        port = free_port()
        hub = [sys.executable, "-m", "hub", "--host", "127.0.0.1", "--port", str(port), "--redis-url", redis.url]
        hub += ["--anonymous", "--embedded-worker", "off", "--publish-rate", "1000000", "--publish-burst", "1000000"]
        hub += ["--log-level", "warning"]
        alone = Server.start("hub publish, no subscriber", hub, port)
        # The same hub process, publishing to a channel that 10 streams watch.
        servers += [alone, Server("hub publish, 10 subscribers", alone.proc, port, subscribers=10)]
        report.add(f"# Publish path benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        report.add()
        report.add(
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. One client, "
            f"one keep-alive connection, bodies sent one at a time at each rate for {args.seconds:g} s; {args.rounds} "
            f"rounds, the servers taking turns; CPU (user + system) of the server's process per request, median. "
            f"Command: `python bench/publish_path.py {' '.join(sys.argv[1:])}`"
        )
        report.add()
        for rate in args.rates:
            figures: dict[str, list[float]] = {s.name: [] for s in servers}
            for _ in range(args.rounds):
                for s in servers:
                    figures[s.name].append(asyncio.run(_window(s, rate, args.seconds)))
            report.add(f"## {rate:g} requests/s")
            report.add()
            report.add("| server | CPU per request | each round | loop polls that waited / did not, reads (strace) |")
            report.add("|---|---|---|---|")
            for s in servers:
                turns = _turns(s, rate, min(args.seconds, 3.0))
                shown = f"{turns[0]:.2f} / {turns[1]:.2f}, {turns[2]:.2f}" if turns else "n/a (no strace)"
                each = ", ".join(f"{f:.0f}" for f in figures[s.name])
                report.add(f"| {s.name} | {statistics.median(figures[s.name]):.0f} µs | {each} | {shown} |")
            report.add()
    finally:
        for s in {id(s.proc): s for s in servers}.values():
            s.stop()
        redis.close()
    report.save(args.out)


if __name__ == "__main__":
    main()
