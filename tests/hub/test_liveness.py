"""Liveness: a loop that stops going round is reported stuck, as a metric and in /healthz's answer."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from hub.settings import HubSettings
from ssecore.backend import ReadResult, TailReader
from ssecore.backend_memory import MemoryBackend
from ssecore.backend_redis import RedisBackend
from ssecore.liveness import Liveness
from tests.conftest import ClientFactory
from tests.hub.test_api import publish, subscribe
from tests.support import RedisServer, collect


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_past_its_bound_is_stuck_until_it_beats_again() -> None:
    clock = _Clock()
    live = Liveness(clock)
    live.watch("fetch", 10.0)
    live.watch("renew", 3.0)
    clock.now += 5
    live.beat("fetch")
    assert live.stuck() == ["renew"]
    status, body = live.report()
    assert status == 503
    answer = orjson.loads(body)
    assert answer["status"] == "stuck" and answer["stuck"] == ["renew"]
    assert answer["loops"]["fetch"]["age_s"] == 0 and answer["loops"]["renew"]["age_s"] == 5
    live.beat("renew")
    assert live.stuck() == [] and live.report()[0] == 200


def test_a_forgotten_loop_is_no_longer_expected() -> None:
    clock = _Clock()
    live = Liveness(clock)
    live.watch("claim", 1.0)
    live.forget("claim")
    clock.now += 60
    assert live.stuck() == [] and live.ages() == {}


def test_the_ages_are_a_gauge_read_at_each_scrape() -> None:
    clock = _Clock()
    live = Liveness(clock)
    registry = CollectorRegistry()
    live.register(registry, "test_loop_progress_age_seconds")
    live.watch("tail", 30.0)
    clock.now += 7.5
    assert 'test_loop_progress_age_seconds{loop="tail"} 7.5' in generate_latest(registry).decode()


def test_a_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tail"):
        Liveness().watch("tail", 0)


# -- the hub's live tail ----------------------------------------------------------------------------------------------


async def _health(node: TestClient[Any, Any]) -> tuple[int, dict[str, Any]]:
    resp = await node.get("/healthz")
    body: dict[str, Any] = orjson.loads(await resp.read())
    return resp.status, body


async def test_healthz_and_metrics_show_how_long_since_the_live_tail_went_round(make_client: ClientFactory) -> None:
    node = await make_client(MemoryBackend(history=100, ttl_s=60), tail_block_s=1.0)
    status, body = await _health(node)
    assert status == 200 and body["status"] == "ok"
    # The embedded worker's loops (a hub without Redis runs one) answer to the same /healthz: one probe covers both.
    assert set(body["loops"]) == {"tail", "presence", "heartbeat", "fetch", "claim", "renew", "poll"}
    assert body["loops"]["tail"]["bound_s"] == 2 * (1.0 + 3.0) + 10
    metrics = await (await node.get("/metrics")).text()
    for loop in body["loops"]:
        assert f'hub_loop_progress_age_seconds{{loop="{loop}"}}' in metrics


async def test_a_node_with_nothing_to_tail_stays_alive(make_client: ClientFactory) -> None:
    """Waiting for a first subscriber is knowing what it waits for: it goes round while it waits."""
    node = await make_client(
        MemoryBackend(history=100, ttl_s=60), tail_block_s=0.2, redis_timeout_s=0.2, tail_stuck_after_s=2.5
    )
    until = time.monotonic() + 4
    while time.monotonic() < until:
        status, body = await _health(node)
        assert status == 200, body
        await asyncio.sleep(0.1)
    # And once it has something to tail, it tails it.
    live = await subscribe(node, "c")
    ids = await publish(node, "c", {"data": "x"})
    assert [e.id for e in await collect(live, count=1)] == ids
    live.close()


class _StuckReader:
    """A live tail that waits for a wake-up nobody sends: the fault liveness exists to catch."""

    async def read(self, positions: Mapping[str, str], *, block_s: float) -> ReadResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def interrupt(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class _StuckTailBackend(MemoryBackend):
    async def open_reader(self) -> Any:  # a TailReader, not the memory backend's own kind
        reader: TailReader = _StuckReader()
        return reader


async def test_a_live_tail_that_stops_going_round_fails_healthz_naming_it(make_client: ClientFactory) -> None:
    node = await make_client(
        _StuckTailBackend(history=100, ttl_s=60), tail_block_s=0.2, redis_timeout_s=0.2, tail_stuck_after_s=2.5
    )
    live = await subscribe(node, "c")  # the tail now reads, and its read never returns
    deadline = time.monotonic() + 15
    while (answer := await _health(node))[0] == 200:
        assert time.monotonic() < deadline, "healthz stayed green while the live tail was stuck"
        await asyncio.sleep(0.1)
    status, body = answer
    assert status == 503 and body["status"] == "stuck" and body["stuck"] == ["tail"]
    live.close()


@pytest.mark.slow
async def test_a_redis_that_stops_answering_fails_readiness_not_liveness(
    make_client: ClientFactory, own_redis: RedisServer
) -> None:
    """Redis frozen (SIGSTOP) while a channel is tailed: each read gives up at its deadline, the tail goes round
    failing, /readyz says so, and /healthz stays green: restarting the node would not bring Redis back."""
    backend = RedisBackend(own_redis.url, prefix="frozen:", history=100, ttl_s=60, timeout_s=0.3)
    assert own_redis.proc is not None
    try:
        node = await make_client(backend, tail_block_s=0.3, redis_timeout_s=0.3, tail_stuck_after_s=6.0)
        live = await subscribe(node, "c")
        await publish(node, "c", {"data": "before"})
        await collect(live, count=1)
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            saw_unready = False
            until = time.monotonic() + 9
            while time.monotonic() < until:
                status, body = await _health(node)
                assert status == 200, body
                saw_unready = saw_unready or (await node.get("/readyz")).status == 503
                await asyncio.sleep(0.2)
            assert saw_unready
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        ids = await publish(node, "c", {"data": "after"})
        assert [e.id for e in await collect(live, count=1, timeout_s=20)] == ids
        live.close()
    finally:
        await backend.aclose()


def test_the_tail_bound_is_derived_unless_set_and_never_below_a_healthy_read() -> None:
    assert HubSettings(anonymous=True).tail_stuck_bound_s == 2 * (5.0 + 3.0) + 10
    assert HubSettings(anonymous=True, tail_stuck_after_s=60).tail_stuck_bound_s == 60
    with pytest.raises(ValueError, match="HUB_TAIL_STUCK_AFTER"):
        HubSettings(anonymous=True, tail_stuck_after_s=7)
