"""Producer benchmark: what one worker process sustains with the demo provider at full speed, and the Redis round
trips per token with coalescing on and off.

Starts its own redis-server and, per mode, one `python -m producer` process; submits the jobs straight to the job
queue, waits until every channel is closed, and reads the worker's own /metrics and Redis' command counts. Bounded;
stops by itself. Prints a Markdown report (also written to --out).

    python bench/producer.py --generations 2000 --tokens 100 --out bench/results-producer.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Report, cpu_seconds  # noqa: E402
from producer.coalesce import DEFAULT_WINDOW_MS  # noqa: E402
from ssecore.jobs import Job, new_generation_id  # noqa: E402
from ssecore.queue_redis import RedisJobQueue  # noqa: E402
from tests.processes import RedisServer, free_port, stop_process, wait_port  # noqa: E402


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def run_mode(redis_url: str, args: argparse.Namespace, coalesce_ms: float, report: Report) -> None:
    prefix = f"bench{int(coalesce_ms * 1000)}:"
    mport = free_port()
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once per mode, before any measurement
        [
            sys.executable,
            "-m",
            "producer",
            "--redis-url",
            redis_url,
            "--key-prefix",
            prefix,
            "--demo-tokens-per-s",
            "0",
            "--concurrency",
            str(args.concurrency),
            "--coalesce-ms",
            str(coalesce_ms),
            "--metrics-port",
            str(mport),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    queue = RedisJobQueue(redis_url, prefix=prefix, group="producers", record_ttl_s=3600)
    try:
        wait_port(mport, proc=worker)
        jobs = []
        for _ in range(args.generations):
            gid = new_generation_id()
            jobs.append(
                Job(
                    id=gid,
                    provider="demo",
                    model=f"demo:{args.tokens}",
                    messages=[{"role": "user", "content": "benchmark"}],
                    channel=f"gen:{gid}",
                )
            )
        await admin.config_resetstat()
        cpu0 = cpu_seconds(worker.pid)
        t0 = time.monotonic()
        for j in jobs:
            await queue.submit(j)
        finished = 'producer_generations_finished_total{outcome="done",provider="demo"}'
        deadline = t0 + args.timeout
        while metric(mport, finished) < len(jobs):
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not finish in time")
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(worker.pid) - cpu0
        stats = await admin.info("commandstats")
        evalsha = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        trips = metric(mport, "producer_append_round_trips_total")
        events = metric(mport, "producer_appended_events_total")
        tokens = args.generations * args.tokens
        label = f"coalescing {coalesce_ms:g} ms" if coalesce_ms else "coalescing off"
        report.add(
            f"| {label} | {args.generations / elapsed:,.0f} | {tokens / elapsed:,.0f} | "
            f"{trips / tokens:.3f} | {evalsha / tokens:.3f} | {cpu / tokens * 1e6:.1f} µs | "
            f"{elapsed:.1f} s |"
        )
        assert events == args.generations * (args.tokens + 2), (events, args.generations * (args.tokens + 2))
    finally:
        stop_process(worker, 30)
        await queue.aclose()
        await admin.aclose()


async def measure(redis_url: str, args: argparse.Namespace, report: Report) -> None:
    for coalesce_ms in (args.coalesce_ms, 0.0):
        await run_mode(redis_url, args, coalesce_ms, report)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--coalesce-ms", type=float, default=DEFAULT_WINDOW_MS)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = Report([])
    redis = RedisServer()
    try:
        redis.start()
        report.add(f"# Producer benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        report.add()
        report.add(
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
            f"One worker process, demo provider at full speed, {args.generations} generations of "
            f"{args.tokens} tokens, concurrency {args.concurrency}. "
            f"Command: `python bench/producer.py {' '.join(sys.argv[1:])}`"
        )
        report.add()
        report.add(
            "| mode | generations/s | tokens/s | append round trips per token | Redis EVALSHA per token "
            "| worker CPU per token | wall time |"
        )
        report.add("|---|---|---|---|---|---|---|")
        asyncio.run(measure(redis.url, args, report))
    finally:
        redis.close()
    report.save(args.out)


if __name__ == "__main__":
    main()
