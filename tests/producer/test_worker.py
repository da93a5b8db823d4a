"""Workers on real Redis: crash take-over, graceful hand-back, many concurrent generations, coalescing."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from producer.providers.base import Finish, GenerationRequest, ReasoningDelta, RefusalDelta, StreamItem, TextDelta
from producer.providers.demo import DemoProvider
from producer.settings import ProducerSettings, ProviderKeys, providers_for
from producer.worker import Worker
from ssecore.backend import Entry
from ssecore.backend_redis import RedisBackend
from ssecore.demo import TOKENS
from ssecore.jobs import Job, new_generation_id
from ssecore.presence import RedisPresence
from ssecore.queue_redis import RedisJobQueue
from ssecore.sse import SSEEvent
from tests.support import (
    ROOT,
    HubProcess,
    ProducerProcess,
    RedisServer,
    free_port,
    read_events,
    settled,
    stored_entries,
    wait_http_ok,
)


@pytest.fixture
def prefix() -> str:
    return f"w{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def stores(redis_server: RedisServer, prefix: str) -> AsyncIterator[tuple[RedisBackend, RedisJobQueue]]:
    backend = RedisBackend(redis_server.url, prefix=prefix, history=100_000, ttl_s=3600)
    queue = RedisJobQueue(redis_server.url, prefix=prefix, group="producers", record_ttl_s=3600)
    yield backend, queue
    await queue.aclose()
    await backend.aclose()


@pytest.fixture
def workers() -> Iterator[list[ProducerProcess]]:
    started: list[ProducerProcess] = []
    yield started
    for w in started:
        w.close()


def _worker_process(
    workers: list[ProducerProcess], redis_server: RedisServer, prefix: str, *args: str
) -> ProducerProcess:
    w = ProducerProcess(
        "--redis-url",
        redis_server.url,
        "--key-prefix",
        prefix,
        "--metrics-port",
        "0",
        "--claim-idle",
        "2",
        "--renew",
        "0.5",
        "--poll",
        "0.1",
        *args,
    )
    workers.append(w)
    w.start()
    return w


def _job(tokens: int, channel: str | None = None) -> Job:
    gid = new_generation_id()
    return Job(
        id=gid,
        provider="demo",
        model=f"demo:{tokens}",
        messages=[{"role": "user", "content": "hi"}],
        channel=channel or f"gen:{gid}",
    )


async def _wait_closed(backend: RedisBackend, channel: str, timeout_s: float) -> list[Entry]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await backend.info(channel)
        if info is not None and info.closed:
            return await stored_entries(backend, channel)
        assert time.monotonic() < deadline, f"{channel} was not finished within {timeout_s}s"
        await asyncio.sleep(0.05)


async def _wait_tokens(backend: RedisBackend, channel: str, count: int, worker: ProducerProcess) -> None:
    """Until the channel holds `count` tokens: the generation is under way."""
    deadline = time.monotonic() + 20
    while len([e for e in await stored_entries(backend, channel) if e.event == "token"]) < count:
        assert time.monotonic() < deadline, worker.log()
        await asyncio.sleep(0.05)


def _check_one_run(entries: list[Entry], tokens: int, *, restarted: bool) -> None:
    """The channel ends with exactly one terminal event, and the last run after any reset is complete and in order."""
    names = [e.event for e in entries]
    assert names.count("done") + names.count("error") == 1 and entries[-1].close and names[-1] == "done"
    assert ("reset" in names) == restarted
    last_run = entries[max((i for i, n in enumerate(names) if n == "reset"), default=-1) + 1 :]
    assert [e.event for e in last_run] == ["start"] + ["token"] * tokens + ["done"]
    assert orjson.loads(last_run[-1].data)["finish_reason"] == "stop"
    if restarted:
        assert orjson.loads(entries[names.index("reset")].data) == {"reason": "restarted"}


@pytest.mark.e2e
async def test_a_killed_worker_s_generation_is_finished_by_another_with_a_reset(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue], workers: list[ProducerProcess]
) -> None:
    backend, queue = stores
    first = _worker_process(workers, redis_server, prefix, "--demo-tokens-per-s", "40", "--consumer", "first")
    job = _job(120)
    await queue.submit(job)
    await _wait_tokens(backend, job.channel, 10, first)
    assert first.proc is not None
    first.proc.kill()  # kill -9 mid-generation
    first.wait(10)
    second = _worker_process(workers, redis_server, prefix, "--demo-tokens-per-s", "400", "--consumer", "second")
    try:
        entries = await _wait_closed(backend, job.channel, 30)
    except AssertionError:
        print(second.log())
        raise
    _check_one_run(entries, 120, restarted=True)
    record = await settled(queue, job.id)
    assert record.status == "done" and record.attempts == 2


@pytest.mark.e2e
async def test_sigterm_hands_running_generations_back_for_another_worker(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue], workers: list[ProducerProcess]
) -> None:
    backend, queue = stores
    leaving = _worker_process(
        workers, redis_server, prefix, "--demo-tokens-per-s", "20", "--grace", "0.5", "--consumer", "leaving"
    )
    jobs = [_job(200) for _ in range(3)]
    for j in jobs:
        await queue.submit(j)
    deadline = time.monotonic() + 20
    while None in [await backend.info(j.channel) for j in jobs]:
        assert time.monotonic() < deadline, leaving.log()
        await asyncio.sleep(0.05)
    leaving.signal(signal.SIGTERM)
    assert await asyncio.to_thread(leaving.wait, 15) == 0
    # Released jobs are claimable at once: far sooner than --claim-idle would allow for a dead worker.
    _worker_process(
        workers,
        redis_server,
        prefix,
        "--demo-tokens-per-s",
        "0",
        "--consumer",
        "staying",
        "--claim-idle",
        "60",
        "--renew",
        "5",
    )
    for j in jobs:
        _check_one_run(await _wait_closed(backend, j.channel, 30), 200, restarted=True)


async def test_two_hundred_concurrent_generations_on_one_worker_all_complete_in_order(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue]
) -> None:
    backend, queue = stores
    settings = ProducerSettings(
        redis_url=redis_server.url, key_prefix=prefix, concurrency=200, metrics_port=0, demo_tokens_per_s=100
    )
    presence = RedisPresence(redis_server.url, prefix=prefix)
    worker = Worker(settings, backend=backend, queue=queue, providers={"demo": DemoProvider(100)}, presence=presence)
    jobs = [_job(50) for _ in range(200)]
    for j in jobs:
        await queue.submit(j)
    task = asyncio.create_task(worker.run_async())
    try:
        for j in jobs:
            entries = await _wait_closed(backend, j.channel, 60)
            _check_one_run(entries, 50, restarted=False)
            tokens = [orjson.loads(e.data)["text"] for e in entries if e.event == "token"]
            assert tokens == [t for t in _demo_tokens(50)]
    finally:
        worker.stop()
        await task
        await presence.aclose()
    records = [await queue.get(j.id) for j in jobs]
    assert all(r is not None and r.status == "done" for r in records)
    # Coalescing: 200 generations x 52 events each went out in far fewer round trips than events.
    events = _metric(worker, "producer_appended_events_total")
    assert events == 200 * 52
    assert _metric(worker, "producer_append_round_trips_total") < events / 5


async def test_without_coalescing_every_event_is_its_own_round_trip(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue]
) -> None:
    backend, queue = stores
    settings = ProducerSettings(
        redis_url=redis_server.url, key_prefix=prefix, metrics_port=0, coalesce_ms=0, demo_tokens_per_s=0
    )
    worker = Worker(settings, backend=backend, queue=queue, providers={"demo": DemoProvider(0)})
    jobs = [_job(30) for _ in range(5)]
    for j in jobs:
        await queue.submit(j)
    task = asyncio.create_task(worker.run_async())
    try:
        for j in jobs:
            _check_one_run(await _wait_closed(backend, j.channel, 30), 30, restarted=False)
    finally:
        worker.stop()
        await task
    assert _metric(worker, "producer_append_round_trips_total") == _metric(worker, "producer_appended_events_total")
    assert _metric(worker, "producer_appended_events_total") == 5 * 32


def _demo_tokens(n: int) -> list[str]:
    out = [TOKENS[i % len(TOKENS)] for i in range(n)]
    out[0] = out[0].lstrip()
    return out


def _metric(worker: Worker, name: str) -> float:
    value: Any = worker.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return float(value)


@pytest.mark.e2e
async def test_a_long_generation_keeps_its_claim_so_no_other_worker_steals_it(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue], workers: list[ProducerProcess]
) -> None:
    backend, queue = stores
    _worker_process(workers, redis_server, prefix, "--demo-tokens-per-s", "40", "--consumer", "healthy")
    job = _job(200)  # ~5 s: more than twice --claim-idle (2 s)
    await queue.submit(job)
    stolen = []
    # Another worker's claim loop, far more eager than a real one: it takes any job idle for 1 s (half the real
    # --claim-idle), checking every 0.1 s. Renewals every 0.5 s keep the healthy worker's job from ever being idle
    # that long.
    while (info := await backend.info(job.channel)) is None or not info.closed:
        stolen += await queue.claim_stale("thief", 1.0, 10)
        await asyncio.sleep(0.1)
    assert stolen == []
    _check_one_run(await stored_entries(backend, job.channel), 200, restarted=False)


@pytest.mark.e2e
async def test_through_a_hub_a_client_sees_the_take_over_as_a_reset_and_gets_the_whole_answer(
    redis_server: RedisServer, prefix: str, workers: list[ProducerProcess]
) -> None:
    hub = HubProcess("--redis-url", redis_server.url, "--key-prefix", prefix)
    hub.start()
    try:
        first = _worker_process(workers, redis_server, prefix, "--demo-tokens-per-s", "40", "--consumer", "first")
        body = {"provider": "demo", "model": "demo:80", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"{hub.url}/v1/generations", json=body, headers={"Accept": "text/event-stream"})
            assert resp.status == 200
            seen: list[SSEEvent] = []
            async with asyncio.timeout(60):
                async for ev in read_events(resp):
                    seen.append(ev)
                    if sum(e.event == "token" for e in seen) == 10 and first.proc is not None:
                        first.proc.kill()
                        first.wait(10)
                        _worker_process(workers, redis_server, prefix, "--demo-tokens-per-s", "400")
            resp.close()
        names = [e.event for e in seen]
        assert names.count("reset") == 1 and names[-1] == "done" and names.count("done") == 1
        after = seen[names.index("reset") + 1 :]
        assert [e.event for e in after] == ["start"] + ["token"] * 80 + ["done"]
        assert "".join(orjson.loads(e.data)["text"] for e in after[1:-1]) == "".join(_demo_tokens(80))
    finally:
        hub.close()


@pytest.mark.e2e
async def test_a_stalled_worker_that_wakes_after_a_take_over_writes_nothing_more(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue], workers: list[ProducerProcess]
) -> None:
    backend, queue = stores
    stalled = _worker_process(workers, redis_server, prefix, "--demo-tokens-per-s", "40", "--consumer", "stalled")
    job = _job(80)
    await queue.submit(job)
    await _wait_tokens(backend, job.channel, 5, stalled)
    deadline = time.monotonic() + 20
    stalled.signal(signal.SIGSTOP)  # a frozen VM, a stop-the-world pause: alive, but not renewing
    try:
        _worker_process(workers, redis_server, prefix, "--demo-tokens-per-s", "40", "--consumer", "rescuer")
        while "reset" not in [e.event for e in await stored_entries(backend, job.channel)]:
            assert time.monotonic() < deadline + 20, "the job was not taken over"
            await asyncio.sleep(0.05)
    finally:
        stalled.signal(signal.SIGCONT)  # it wakes mid-generation and would carry on writing
    entries = await _wait_closed(backend, job.channel, 30)
    _check_one_run(entries, 80, restarted=True)
    assert [e.event for e in entries].count("start") == 2
    await asyncio.sleep(1.0)  # the woken worker has had time to notice and must have written nothing since
    assert len(await stored_entries(backend, job.channel)) == len(entries)
    record = await queue.get(job.id)
    assert record is not None and record.status == "done"


@pytest.mark.slow
async def test_a_store_outage_mid_generation_never_finishes_over_a_gap(prefix: str) -> None:
    server = RedisServer()
    server.start()
    backend = RedisBackend(server.url, prefix=prefix, history=100_000, ttl_s=3600, timeout_s=1.0)
    queue = RedisJobQueue(server.url, prefix=prefix, group="producers", record_ttl_s=3600)
    admin = aioredis.Redis.from_url(server.url)
    settings = ProducerSettings(
        redis_url=server.url, key_prefix=prefix, metrics_port=0, claim_idle_s=1.5, renew_s=0.5, demo_tokens_per_s=100
    )
    worker = Worker(settings, backend=backend, queue=queue, providers={"demo": DemoProvider(100)})
    task = asyncio.create_task(worker.run_async())
    try:
        job = _job(300)
        await queue.submit(job)
        deadline = time.monotonic() + 20
        while len(await stored_entries(backend, job.channel)) < 20:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # Redis holds every write for longer than the worker's deadline: those appends fail (their outcome
        # unknown to the worker), and later ones would succeed.
        await admin.client_pause(1500, all=False)
        entries = await _wait_closed(backend, job.channel, 40)
        # The run that lost tokens did not finish; a re-run from a reset did, completely.
        _check_one_run(entries, 300, restarted=True)
    finally:
        worker.stop()
        await task
        await admin.aclose()
        await queue.aclose()
        await backend.aclose()
        server.close()


@pytest.mark.e2e
async def test_a_run_whose_latest_events_the_store_lost_is_re_run_not_continued_over_the_hole(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue], workers: list[ProducerProcess]
) -> None:
    """A failover to a replica that lacked the newest writes takes back events the worker was told were stored, while
    it waits for the provider's next token: nothing fails then. Its next append must notice, not write on over the
    hole (the answer would miss tokens for good)."""
    backend, queue = stores
    worker = _worker_process(workers, redis_server, prefix, "--demo-tokens-per-s", "4", "--coalesce-ms", "0")
    job = _job(12)
    await queue.submit(job)
    await _wait_tokens(backend, job.channel, 3, worker)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        # Right after a token (at 4 tokens/s the next is 250 ms away): the store forgets it.
        key = f"{prefix}ch:{{{job.channel}}}"
        newest: Any = await admin.xrevrange(key, count=1)
        await admin.xdel(key, newest[0][0])
    finally:
        await admin.aclose()
    entries = await _wait_closed(backend, job.channel, 60)
    _check_one_run(entries, 12, restarted=True)


class _Reasoner:
    """A provider that thinks aloud, refuses part of the request, then answers: what reasoning models stream."""

    name = "demo"
    kind = "demo"

    async def stream(
        self, session: aiohttp.ClientSession, request: GenerationRequest
    ) -> AsyncGenerator[StreamItem, None]:
        yield ReasoningDelta("The user greets me.")
        yield ReasoningDelta(" Greet back.")
        yield RefusalDelta("No secrets.")
        yield TextDelta("Hello")
        yield Finish("stop", 3, 9)


async def test_reasoning_and_refusals_reach_the_channel_as_their_own_events(
    stores: tuple[RedisBackend, RedisJobQueue], redis_server: RedisServer, prefix: str
) -> None:
    backend, queue = stores
    settings = ProducerSettings(redis_url=redis_server.url, key_prefix=prefix, metrics_port=0)
    worker = Worker(settings, backend=backend, queue=queue, providers={"demo": _Reasoner()})
    task = asyncio.create_task(worker.run_async())
    try:
        job = _job(1)
        await queue.submit(job)
        entries = await _wait_closed(backend, job.channel, 20)
    finally:
        worker.stop()
        await task
    assert [(e.event, orjson.loads(e.data).get("text")) for e in entries[1:-1]] == [
        ("reasoning", "The user greets me."),
        ("reasoning", " Greet back."),
        ("refusal", "No secrets."),
        ("token", "Hello"),
    ]
    assert entries[-1].event == "done" and orjson.loads(entries[-1].data)["finish_reason"] == "stop"


async def test_workers_recover_when_the_job_stream_and_group_vanish(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue]
) -> None:
    backend, queue = stores
    settings = ProducerSettings(redis_url=redis_server.url, key_prefix=prefix, metrics_port=0, demo_tokens_per_s=0)
    worker = Worker(settings, backend=backend, queue=queue, providers={"demo": DemoProvider(0)})
    task = asyncio.create_task(worker.run_async())
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        first = _job(5)
        await queue.submit(first)
        await _wait_closed(backend, first.channel, 10)
        await admin.delete(queue.keys.jobs)  # as after a Redis restart without persistence
        second = _job(5)
        await queue.submit(second)
        _check_one_run(await _wait_closed(backend, second.channel, 20), 5, restarted=False)
    finally:
        worker.stop()
        await task
        await admin.aclose()


@pytest.mark.e2e
async def test_cancel_through_redis_and_the_worker_metrics_endpoint(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue], workers: list[ProducerProcess]
) -> None:
    backend, queue = stores
    port = free_port()
    w = ProducerProcess(
        "--redis-url",
        redis_server.url,
        "--key-prefix",
        prefix,
        "--metrics-port",
        str(port),
        "--demo-tokens-per-s",
        "50",
        "--poll",
        "0.1",
    )
    workers.append(w)
    w.start()
    job = _job(100_000)
    await queue.submit(job)
    deadline = time.monotonic() + 20
    while len(await stored_entries(backend, job.channel)) < 5:
        assert time.monotonic() < deadline, w.log()
        await asyncio.sleep(0.05)
    asked = time.monotonic()
    await queue.request_cancel(job.id)
    entries = await _wait_closed(backend, job.channel, 10)
    assert time.monotonic() - asked < 1.0
    assert orjson.loads(entries[-1].data)["finish_reason"] == "cancelled"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    assert 'producer_generations_finished_total{outcome="cancelled",provider="demo"} 1.0' in text
    assert "producer_time_to_first_token_seconds_count" in text and "producer_queue_lag_seconds_count 1.0" in text


@pytest.mark.e2e
async def test_worker_readiness_follows_redis_and_liveness_does_not(workers: list[ProducerProcess]) -> None:
    """/readyz is 503 while the worker cannot reach Redis (a rollout waits for it), and 200 again once it can, without
    a restart; /healthz stays 200 all along (a Redis outage must not make Kubernetes restart every worker)."""
    server = RedisServer()
    server.start()
    port = free_port()
    try:
        w = ProducerProcess("--redis-url", server.url, "--key-prefix", "ready:", "--metrics-port", str(port))
        workers.append(w)
        w.start()
        base = f"http://127.0.0.1:{port}"

        async def until(path: str, status: int) -> dict[str, Any]:
            deadline = time.monotonic() + 20
            async with aiohttp.ClientSession() as session:
                while True:
                    try:
                        async with session.get(base + path) as resp:
                            if resp.status == status:
                                body: dict[str, Any] = await resp.json()
                                return body
                    except aiohttp.ClientConnectionError:
                        pass  # the metrics server is not up yet
                    assert time.monotonic() < deadline, (path, status, w.log()[-2000:])
                    await asyncio.sleep(0.1)

        assert await until("/readyz", 200) == {"status": "ready"}
        server.stop()
        assert await until("/readyz", 503) == {"status": "unavailable", "reason": "backend_unavailable"}
        assert (await until("/healthz", 200))["status"] == "ok"
        server.start()
        assert await until("/readyz", 200) == {"status": "ready"}
    finally:
        server.close()


@pytest.mark.e2e
async def test_a_second_worker_on_the_same_metrics_port_exits_with_one_line_naming_the_setting(
    workers: list[ProducerProcess], redis_server: RedisServer, prefix: str
) -> None:
    port = free_port()
    first = _worker_process(workers, redis_server, prefix, "--metrics-port", str(port))
    async with aiohttp.ClientSession() as session:
        await wait_http_ok(session, f"http://127.0.0.1:{port}/healthz", why=first.log)
    second = _worker_process(workers, redis_server, prefix, "--metrics-port", str(port))
    assert second.wait(30) == 2
    out = second.log()
    assert out.splitlines() == [
        f"python -m producer: cannot listen on 0.0.0.0:{port}: another process holds that port; set --metrics-port "
        "(PRODUCER_METRICS_PORT) to a free port (each worker on a host needs its own), or 0 for no metrics server"
    ]


@pytest.mark.e2e
async def test_an_idle_worker_stays_live_past_its_bounds_and_shows_each_loop_s_progress_age(
    workers: list[ProducerProcess], redis_server: RedisServer, prefix: str
) -> None:
    """Idle is not stuck: every loop goes round while there is nothing to do, so /healthz stays 200 well past the
    bounds of claim, renew and poll, and /metrics shows each loop's age."""
    port = free_port()
    w = _worker_process(
        workers, redis_server, prefix, "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--stall-after", "1"
    )
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await wait_http_ok(session, base + "/healthz", why=w.log)
        watched_until = time.monotonic() + 9
        while time.monotonic() < watched_until:
            async with session.get(base + "/healthz") as resp:
                body = await resp.json()
                assert resp.status == 200, body
            await asyncio.sleep(0.25)
        assert body["status"] == "ok" and set(body["loops"]) == {"fetch", "claim", "renew", "poll"}
        # --renew 0.5, a Redis call's deadline of 5 s (a round while Redis is down), then --stall-after 1
        assert body["loops"]["renew"]["bound_s"] == 6.5
        async with session.get(base + "/metrics") as resp:
            text = await resp.text()
    for loop in ("fetch", "claim", "renew", "poll"):
        assert f'producer_loop_progress_age_seconds{{loop="{loop}"}}' in text


@pytest.mark.parametrize(
    ("demo", "model", "code"),
    [
        # The hub refuses such a model; one that reaches the queue another way must not hold a slot for centuries.
        (True, "demo:999999999999", "bad_request"),
        # A worker with --no-demo runs no demo job at all.
        (False, "demo:3", "unknown_provider"),
    ],
)
async def test_demo_jobs_a_worker_must_not_run_end_with_an_error_at_once(
    redis_server: RedisServer,
    prefix: str,
    stores: tuple[RedisBackend, RedisJobQueue],
    demo: bool,
    model: str,
    code: str,
) -> None:
    backend, queue = stores
    settings = ProducerSettings(redis_url=redis_server.url, key_prefix=prefix, metrics_port=0)  # demo on: the default
    if not demo:
        settings = dataclasses.replace(settings, demo=False)
    worker = Worker(settings, backend=backend, queue=queue, providers=providers_for(settings, ProviderKeys()))
    job = dataclasses.replace(_job(1), model=model)
    await queue.submit(job)
    task = asyncio.create_task(worker.run_async())
    try:
        record = await settled(queue, job.id, timeout_s=20)
    finally:
        worker.stop()
        await task
    assert record.status == "error" and record.error is not None and record.error["code"] == code


@pytest.mark.parametrize("coalesce_ms", [0.0, 2.0])
async def test_a_job_whose_channel_lost_its_owner_ends_with_an_error_and_writes_nothing(
    redis_server: RedisServer, prefix: str, stores: tuple[RedisBackend, RedisJobQueue], coalesce_ms: float
) -> None:
    backend, queue = stores
    # Its hub undid the reservation (the submit's answer was lost, but the job was queued).
    lost = dataclasses.replace(_job(3), owner="jwt:alice")
    assert await backend.reserve(lost.channel, "jwt:alice") and await backend.release(lost.channel, "jwt:alice")
    owned = dataclasses.replace(_job(3), owner="jwt:alice")
    assert await backend.reserve(owned.channel, "jwt:alice")
    older = _job(3)  # queued by a hub that kept no owners
    for job in (lost, owned, older):
        await queue.submit(job)
    settings = ProducerSettings(
        redis_url=redis_server.url, key_prefix=prefix, metrics_port=0, demo_tokens_per_s=0, coalesce_ms=coalesce_ms
    )
    worker = Worker(settings, backend=backend, queue=queue, providers={"demo": DemoProvider(0)})
    task = asyncio.create_task(worker.run_async())
    try:
        records = [await settled(queue, job.id, timeout_s=20) for job in (lost, owned, older)]
        deadline = time.monotonic() + 10
        while (await queue._redis.xpending(queue.keys.jobs, "producers"))["pending"]:  # each acknowledged
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await task
    assert records[0].status == "error" and records[0].error is not None
    assert records[0].error["code"] == "channel_lost"
    assert await backend.info(lost.channel) is None and await backend.owner(lost.channel) is None
    assert [r.status for r in records[1:]] == ["done", "done"]
    _check_one_run(await stored_entries(backend, owned.channel), 3, restarted=False)
    assert await backend.owner(owned.channel) == "jwt:alice"
    _check_one_run(await stored_entries(backend, older.channel), 3, restarted=False)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--redis-url (PRODUCER_REDIS_URL): a worker process needs Redis, by URL or by --redis-sentinels"),
        (
            [
                "--redis-url",
                "redis://127.0.0.1:1/0",
                "--redis-sentinels",
                "127.0.0.1:1",
                "--redis-sentinel-master",
                "m",
            ],
            "--redis-sentinels (PRODUCER_REDIS_SENTINELS): give either --redis-url (PRODUCER_REDIS_URL) or Sentinels",
        ),
        (["--redis-sentinels", "127.0.0.1:1"], "--redis-sentinel-master (PRODUCER_REDIS_SENTINEL_MASTER): must name"),
    ],
)
def test_a_worker_given_redis_two_ways_or_none_says_so_in_one_line(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRODUCER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "producer", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
