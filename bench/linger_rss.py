"""Idle-node memory: the RSS of a hub node that no longer tails a channel while another process appends to it.

A node subscribes to a channel's ring while it tails it. Once the channel's last subscriber has left and its
`--linger` is over, the node must let the subscription go and keep none of what is appended elsewhere; workers
writing generations that nobody on this node watches do exactly that all day. Starts its own redis-server and one hub
node (`--linger 1`), opens and closes one stream on the channel, waits past the linger, reads the node's RSS, appends
`--events` events of `--event-bytes` to the channel from this process, waits, and reads the RSS again. Bounded; stops
by itself.

    python bench/linger_rss.py                  # 1,000 x 100 KB: 100 MB appended
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssecore.backend import NewEvent  # noqa: E402
from ssecore.backend_redis import RedisBackend  # noqa: E402
from tests.processes import RedisServer, free_port, stop_process, wait_port  # noqa: E402

_CHANNEL = "unwatched"
_SETTLE_S = 3.0  # past the node's --linger of 1 s, and for the node to act on what was appended


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def measure(redis_url: str, hub_port: int, hub_pid: int, args: argparse.Namespace) -> tuple[float, float]:
    base = f"http://127.0.0.1:{hub_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/channels/{_CHANNEL}/events") as stream:
            assert stream.status == 200, await stream.text()
            await asyncio.sleep(0.5)  # tailed: subscribed to the channel's ring
    await asyncio.sleep(_SETTLE_S)
    before = rss_mb(hub_pid)
    backend = RedisBackend(redis_url, prefix="hub:", history=100, ttl_s=600)
    try:
        payload = "x" * args.event_bytes
        for _ in range(args.events):
            await backend.append(_CHANNEL, [NewEvent("message", payload)])
    finally:
        await backend.aclose()
    await asyncio.sleep(_SETTLE_S)
    return before, rss_mb(hub_pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--event-bytes", type=int, default=100_000)
    args = ap.parse_args()
    redis = RedisServer()
    hub: subprocess.Popen[bytes] | None = None
    try:
        redis.start()
        hport = free_port()
        hub_args = ["--redis-url", redis.url, "--port", str(hport), "--anonymous", "--linger", "1"]
        hub_args += ["--embedded-worker", "off", "--log-level", "warning"]
        hub = subprocess.Popen([sys.executable, "-m", "hub", *hub_args], cwd=ROOT)
        wait_port(hport, proc=hub)
        before, after = asyncio.run(measure(redis.url, hport, hub.pid, args))
        appended = args.events * args.event_bytes / 1e6
        print(f"hub RSS after its last stream left: {before:.1f} MB; after {appended:.0f} MB appended: {after:.1f} MB")
    finally:
        stop_process(hub, 15)
        redis.close()


if __name__ == "__main__":
    main()
