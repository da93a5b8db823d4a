"""A hub on Redis named by Sentinels: it follows a failover to the promoted replica without a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from hub.sse import SSEEvent
from tests.support import HubProcess, RedisSentinels, ResumingClient, wait_http_ok


@pytest.fixture
def sentinels() -> Iterator[RedisSentinels]:
    servers = RedisSentinels()
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


@pytest.fixture
def hub(sentinels: RedisSentinels) -> Iterator[HubProcess]:
    node = HubProcess(
        "--redis-sentinels",
        sentinels.addresses,
        "--redis-sentinel-master",
        sentinels.MASTER,
        "--redis-timeout",
        "2",
        "--tail-block",
        "1",
        env={"HUB_REDIS_PASSWORD": sentinels.PASSWORD},
    )
    try:
        node.start()
        yield node
    finally:
        node.close()


async def _publish(session: aiohttp.ClientSession, url: str, data: str, *, timeout_s: float = 60) -> None:
    """Publish one event, retrying refusals (503 while no primary is reachable) until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with session.post(url, json=[{"data": data}]) as resp:
                if resp.status == 201:
                    return
                assert resp.status == 503, await resp.text()
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"publish of {data} refused for {timeout_s}s"
        await asyncio.sleep(0.2)


async def _until_seen(client: ResumingClient, data: str, hub: HubProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(e.data == data for e in client.events):
        assert time.monotonic() < deadline, f"{data} not delivered: {client.attempts[-3:]}\n{hub.log()[-3000:]}"
        await asyncio.sleep(0.1)


def _without_gap(events: list[SSEEvent], before: list[str], after: list[str]) -> None:
    """After `before`, a subscriber gets `after` in order, exactly once, and whatever of the channel it misses in
    between (events the new primary never received) is announced by a `reset`, never skipped in silence."""
    data = [e.data for e in events if e.event != "reset"]
    assert [d for d in data if d in after] == after
    assert data == before + after or any(e.event == "reset" for e in events), [(e.event, e.data) for e in events]


async def test_a_hub_follows_a_sentinel_failover_and_delivers_what_is_published_after_it(
    sentinels: RedisSentinels, hub: HubProcess
) -> None:
    channel = f"{hub.url}/v1/channels/fo/events"
    async with aiohttp.ClientSession() as session:
        await wait_http_ok(session, f"{hub.url}/readyz", why=hub.log)
        live = ResumingClient(session, channel, last_event_id="0", retry_s=0.2)
        reading = asyncio.create_task(live.run())
        try:
            before = [f"b{i}" for i in range(5)]
            for data in before:
                await _publish(session, channel, data, timeout_s=10)
            await _until_seen(live, before[-1], hub)
            resume_from = live.last_event_id

            old = sentinels.kill_primary()
            deadline = time.monotonic() + 60
            while sentinels.primary_port() == old:
                assert time.monotonic() < deadline, "Sentinels promoted no replica"
                await asyncio.sleep(0.2)
            # Ready again on the new primary, the hub never restarted.
            await wait_http_ok(session, f"{hub.url}/readyz", timeout_s=60, why=hub.log)
            assert hub.proc is not None and hub.proc.poll() is None

            after = [f"a{i}" for i in range(5)]
            for data in after:
                await _publish(session, channel, data)
            await _until_seen(live, after[-1], hub)
            _without_gap(live.events, before, after)

            # A subscriber that was away during the failover resumes from its Last-Event-ID on the new primary.
            back = ResumingClient(session, channel, last_event_id=resume_from, retry_s=0.2)
            resuming = asyncio.create_task(back.run())
            try:
                await _until_seen(back, after[-1], hub)
            finally:
                resuming.cancel()
            _without_gap(back.events, [], after)
        finally:
            reading.cancel()
