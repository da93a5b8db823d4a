"""Core benchmark of one hub node: memory per idle SSE connection and publish-to-delivery latency.

Starts its own redis-server (unless --backend memory) and one `python -m hub` process on free loopback ports,
measures from the outside (RSS and CPU from /proc, latency from the client), stops everything, and prints a
Markdown report (also written to --out). Bounded in time; it stops by itself.

    python bench/core.py --connections 2000 --rate 200 --seconds 10 --out bench/results.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.sse import SSEParser  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


@dataclass
class Report:
    lines: list[str]

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


async def open_idle(port: int, channel: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /v1/channels/{channel}/events HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"subscribe failed: {head[:80]!r}")
    await asyncio.wait_for(reader.readuntil(b": ok\n\n"), 30)
    return reader, writer


async def measure_idle(pid: int, port: int, n: int, channels: int, report: Report) -> list[asyncio.StreamWriter]:
    warm = [await open_idle(port, f"idle:{i}") for i in range(20)]
    for _, w in warm:
        w.close()
    await asyncio.sleep(1.0)
    before = rss_bytes(pid)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for start in range(0, n, 200):
        conns += await asyncio.gather(
            *(open_idle(port, f"idle:{i % channels}") for i in range(start, min(n, start + 200)))
        )
    await asyncio.sleep(2.0)
    after = rss_bytes(pid)
    report.add(f"| idle connections | {n} over {channels} channels |")
    report.add(f"| hub RSS before / after | {before / 2**20:.1f} MiB / {after / 2**20:.1f} MiB |")
    report.add(f"| RSS per idle connection | {(after - before) / n / 1024:.2f} KiB |")
    return [w for _, w in conns]


async def measure_latency(
    pid: int, url: str, subs: int, channels: int, rate: float, seconds: float, report: Report
) -> None:
    latencies: list[float] = []
    expected = int(rate * seconds)
    per_channel = expected // channels
    received = [0] * subs
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def subscriber(i: int) -> None:
            async with session.get(f"{url}/v1/channels/lat:{i % channels}/events") as resp:
                parser = SSEParser()
                async for chunk in resp.content.iter_any():
                    now = time.time()
                    for ev in parser.feed(chunk):
                        latencies.append(now - orjson.loads(ev.data)["t"])
                        received[i] += 1
                    if received[i] >= per_channel:
                        return

        tasks = [asyncio.create_task(subscriber(i)) for i in range(subs)]
        await asyncio.sleep(1.0)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        interval = channels / rate
        for k in range(per_channel):
            target = t0 + k * interval
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for c in range(channels):
                body = orjson.dumps({"event": "token", "data": {"t": time.time(), "k": k}})
                async with session.post(
                    f"{url}/v1/channels/lat:{c}/events", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    assert r.status == 201
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 30)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    delivered = len(latencies)
    report.add(
        f"| latency load | {subs} subscribers on {channels} channels, {rate:g} events/s published for {t1 - t0:.1f} s |"
    )
    report.add(f"| deliveries | {delivered} (expected {per_channel * channels * subs // channels}) |")
    report.add(
        f"| publish-to-receipt latency p50 / p90 / p99 / max | {q[49] * 1000:.2f} / {q[89] * 1000:.2f} / "
        f"{q[98] * 1000:.2f} / {latencies[-1] * 1000:.2f} ms |"
    )
    report.add(f"| hub CPU per delivered event (publish included) | {(cpu1 - cpu0) / delivered * 1e6:.1f} µs |")


async def measure(args: argparse.Namespace, pid: int, port: int, report: Report) -> None:
    idle = await measure_idle(pid, port, args.connections, args.channels, report)
    for w in idle:
        w.close()
    await asyncio.sleep(1.0)
    url = f"http://127.0.0.1:{port}"
    await measure_latency(pid, url, args.subscribers, args.lat_channels, args.rate, args.seconds, report)


def run(args: argparse.Namespace) -> Report:
    report = Report([])
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.mkdtemp(prefix="hub-bench-")
    try:
        hub_args = ["--host", "127.0.0.1", "--log-level", "warning", "--anonymous"]
        if args.backend == "redis":
            rport = free_port()
            exe = shutil.which("redis-server") or "redis-server"
            redis_cmd = [exe, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            procs.append(subprocess.Popen([*redis_cmd, "--dir", tmp], stdout=subprocess.DEVNULL))
            wait_port(rport)
            hub_args += ["--redis-url", f"redis://127.0.0.1:{rport}/0"]
        port = free_port()
        hub = subprocess.Popen([sys.executable, "-m", "hub", "--port", str(port), *hub_args], cwd=ROOT)
        procs.append(hub)
        wait_port(port)
        report.add(f"# Hub core benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        report.add()
        report.add(
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"backend: {args.backend}. Command: `python bench/core.py {' '.join(sys.argv[1:])}`"
        )
        report.add()
        report.add("| measure | value |")
        report.add("|---|---|")
        asyncio.run(measure(args, hub.pid, port, report))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["redis", "memory"], default="redis")
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--channels", type=int, default=100)
    ap.add_argument("--subscribers", type=int, default=100)
    ap.add_argument("--lat-channels", type=int, default=10)
    ap.add_argument("--rate", type=float, default=200.0, help="events/s published, over all channels")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = run(args)
    if args.out:
        args.out.write_text("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
