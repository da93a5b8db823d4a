"""A hub and a worker on Redis named by Sentinels: they follow a failover to the promoted replica without a
restart."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest

from ssecore.backend import AppendBatch, Fence, Idempotency, NewEvent, NotReplicated
from ssecore.backend_redis import RedisBackend
from ssecore.redis_client import RedisTarget
from ssecore.sse import SSEEvent
from tests.support import (
    HubProcess,
    ProducerProcess,
    RedisSentinels,
    ResumingClient,
    free_port,
    run_demo_generation,
    wait_http_ok,
)

pytestmark = pytest.mark.e2e


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
        *sentinels.hub_args(),
        "--redis-timeout",
        "2",
        "--tail-block",
        "1",
        "--demo",
        env={"HUB_REDIS_PASSWORD": sentinels.PASSWORD},
    )
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def worker(sentinels: RedisSentinels) -> Iterator[tuple[ProducerProcess, str]]:
    """A worker process and the URL of its /readyz."""
    # The Sentinels by environment variable, the way a deployment gives them.
    env = {
        "PRODUCER_REDIS_SENTINELS": sentinels.addresses,
        "PRODUCER_REDIS_SENTINEL_MASTER": sentinels.MASTER,
        "PRODUCER_REDIS_PASSWORD": sentinels.PASSWORD,
    }
    port = free_port()
    w = ProducerProcess("--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--demo-tokens-per-s", "0", env=env)
    try:
        w.start()
        yield w, f"http://127.0.0.1:{port}/readyz"
    finally:
        w.close()


async def test_a_backend_on_sentinels_wakes_a_blocked_reader_and_closes_all_it_opened(
    sentinels: RedisSentinels,
) -> None:
    """Appends go to the primary the Sentinels name, through redis-py (not the pipelined connection, which holds one
    address), and the live tail's ring subscription is on that primary too. Whatever was opened is closed: an
    unclosed connection would fail the test (warnings are errors)."""
    target = RedisTarget(
        sentinels=tuple(("127.0.0.1", s.port) for s in sentinels.sentinels),
        master=sentinels.MASTER,
        password=sentinels.PASSWORD,
    )
    backend = RedisBackend(target, prefix="s:", history=100, ttl_s=60, timeout_s=5)
    try:
        first = await backend.append("c", [NewEvent("message", "one")])
        reader = await backend.open_reader()
        try:
            assert [e.id for e in (await reader.read({"c": "0-0"}, block_s=1.0)).entries["c"]] == first
            woken = asyncio.create_task(reader.read({"c": first[-1]}, block_s=20.0))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            second = await backend.append("c", [NewEvent("message", "two")])
            result = await asyncio.wait_for(woken, 30)
            assert [e.id for e in result.entries["c"]] == second
            assert time.monotonic() - started < 15  # woken by the ring, not by the end of its 20 s block
        finally:
            await reader.aclose()
    finally:
        await backend.aclose()
    del backend, reader
    gc.collect()  # a connection left open warns when collected: now, within the test, where it fails it


async def test_a_backend_on_sentinels_answers_a_write_once_a_replica_holds_it(sentinels: RedisSentinels) -> None:
    """--publish-replicas through redis-py (the Sentinel form): WAIT on the append's own connection."""
    target = RedisTarget(
        sentinels=tuple(("127.0.0.1", s.port) for s in sentinels.sentinels),
        master=sentinels.MASTER,
        password=sentinels.PASSWORD,
    )
    backend = RedisBackend(target, prefix="s:", history=100, ttl_s=60, timeout_s=5, replicas=2, replicas_timeout_s=0.3)
    key = Idempotency("k", "f")
    try:
        await backend.append("c", [NewEvent("message", "zero")])
        stopped = [r.proc for r in sentinels.replicas if r.proc is not None]
        for proc in stopped:
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(NotReplicated):
                await backend.append_once("c", [NewEvent("message", "one")], key)
            [result] = await backend.append_many(
                [AppendBatch("g", [NewEvent("token", "t")], fence=Fence("j", 1, True))]
            )
            assert isinstance(result, NotReplicated)
        finally:
            for proc in stopped:
                os.kill(proc.pid, signal.SIGCONT)
        again = await backend.append_once("c", [NewEvent("message", "one")], key)
        assert again.replayed
        assert [e.data for e in (await backend.range("c", "0", limit=10)).entries] == ["zero", "one"]
    finally:
        await backend.aclose()


async def _publish(session: aiohttp.ClientSession, url: str, data: str, *, timeout_s: float = 60) -> int:
    """Publish one event, retrying refusals (503 with Retry-After while no primary is reachable) with the same
    Idempotency-Key, as a client should, until `timeout_s`; the number of refusals."""
    deadline = time.monotonic() + timeout_s
    refused = 0
    while True:
        try:
            async with session.post(url, json=[{"data": data}], headers={"Idempotency-Key": data}) as resp:
                if resp.status == 201:
                    return refused
                assert resp.status == 503 and "Retry-After" in resp.headers, await resp.text()
                refused += 1
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


async def test_a_hub_and_a_worker_follow_a_sentinel_failover(
    sentinels: RedisSentinels, hub: HubProcess, worker: tuple[ProducerProcess, str]
) -> None:
    channel = f"{hub.url}/v1/channels/fo/events"
    producer, producer_ready = worker
    async with aiohttp.ClientSession() as session:
        await wait_http_ok(session, f"{hub.url}/readyz", why=hub.log)
        await wait_http_ok(session, producer_ready, why=producer.log)
        live = ResumingClient(session, channel, last_event_id="0", retry_s=0.2)
        reading = asyncio.create_task(live.run())
        try:
            before = [f"b{i}" for i in range(5)]
            for data in before:
                await _publish(session, channel, data, timeout_s=10)
            await _until_seen(live, before[-1], hub)
            resume_from = live.last_event_id

            old = sentinels.kill_primary()
            # Not ready while no primary is reachable: a health check that stayed green would send traffic here.
            deadline = time.monotonic() + 30
            while True:
                async with session.get(f"{hub.url}/readyz") as resp:
                    if resp.status == 503:
                        break
                assert time.monotonic() < deadline, "/readyz stayed 200 with the primary dead"
                await asyncio.sleep(0.05)
            # Published while there is no primary: refused until there is one again, then stored once.
            assert await _publish(session, channel, "a0") >= 1
            deadline = time.monotonic() + 60
            while sentinels.primary_port() == old:
                assert time.monotonic() < deadline, "Sentinels promoted no replica"
                await asyncio.sleep(0.2)
            # Ready again on the new primary, the hub never restarted.
            await wait_http_ok(session, f"{hub.url}/readyz", timeout_s=60, why=hub.log)
            await wait_http_ok(session, producer_ready, timeout_s=60, why=producer.log)
            assert hub.proc is not None and hub.proc.poll() is None

            after = [f"a{i}" for i in range(5)]
            for data in after[1:]:
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

            # The worker, never restarted either, takes a generation from the queue on the new primary and runs it
            # to its one terminal event.
            names = await run_demo_generation(session, hub.url, 20)
            assert names == ["start"] + ["token"] * 20 + ["done"], (names, producer.log()[-3000:])
            assert producer.proc is not None and producer.proc.poll() is None
        finally:
            reading.cancel()
