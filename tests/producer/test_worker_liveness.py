"""A worker keeps taking jobs, and shows that its loops go round: /healthz fails, naming the loop, when one stops."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from producer.endpoints import endpoints_app
from producer.providers.demo import DemoProvider
from producer.settings import ProducerSettings
from producer.worker import Worker
from ssecore.backend_memory import MemoryBackend
from ssecore.backend_redis import RedisBackend
from ssecore.jobs import Delivery, Job, new_generation_id
from ssecore.queue_memory import MemoryJobQueue
from ssecore.queue_redis import RedisJobQueue
from tests.support import RedisServer, settled


class HeldClaims(MemoryJobQueue):
    """The in-process job queue, except that a claim can be held in flight until the test lets it return, as a slow
    XAUTOCLAIM round trip (or one that never comes back) would be."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.held = asyncio.Event()  # a claim is in flight, held
        self.let_go = asyncio.Event()
        self.fetched_while_held = asyncio.Event()  # a fetch returned while that claim was in flight

    async def claim_stale(self, consumer: str, min_idle_s: float, count: int) -> list[Delivery]:
        if self.hold:
            self.held.set()
            await self.let_go.wait()
        return await super().claim_stale(consumer, min_idle_s, count)

    async def fetch(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        out = await super().fetch(consumer, count, block_s)
        if self.held.is_set() and not self.let_go.is_set():
            self.fetched_while_held.set()
        return out


def _job(tokens: int) -> Job:
    gid = new_generation_id()
    return Job(gid, "demo", f"demo:{tokens}", [{"role": "user", "content": "hi"}], channel=f"gen:{gid}")


@pytest.fixture
async def held_worker() -> AsyncIterator[tuple[Worker, HeldClaims]]:
    # Short claim and renew periods, as `--claim-idle 3 --renew 0.5` and less: the claim loop goes round often.
    settings = ProducerSettings(concurrency=4, claim_idle_s=0.6, renew_s=0.1, poll_s=0.05, stall_after_s=1.0)
    queue = HeldClaims()
    backend = MemoryBackend(history=1000, ttl_s=3600)
    # An in-process queue: no call of it waits for a network deadline.
    worker = Worker(settings, backend=backend, queue=queue, providers={"demo": DemoProvider(0)}, store_timeout_s=0.0)
    task = asyncio.create_task(worker.run_async())
    yield worker, queue
    queue.let_go.set()
    worker.stop()
    await asyncio.wait_for(task, 20)


async def test_a_fetch_that_comes_round_during_a_claim_still_takes_jobs_after_it(
    held_worker: tuple[Worker, HeldClaims],
) -> None:
    """A claim reserves every free slot while it is in flight. The fetch loop that comes round in that moment finds
    no room and waits for some; the claim's return must wake it, or the worker never fetches again (it goes on
    renewing and claiming, and looks healthy)."""
    _worker, queue = held_worker
    queue.hold = True
    await asyncio.wait_for(queue.held.wait(), 10)
    await asyncio.wait_for(queue.fetched_while_held.wait(), 10)  # came round, found every slot reserved
    queue.hold = False
    queue.let_go.set()  # the claim returns, with nothing to take over
    job = _job(3)
    await queue.submit(job)
    record = await settled(queue, job.id, timeout_s=10)
    assert record.status == "done"


async def test_a_worker_with_short_claim_periods_on_redis_still_takes_a_job_seconds_later(
    redis_server: RedisServer,
) -> None:
    """The way a new user meets it: a fresh worker at `--claim-idle 3 --renew 0.5` on Redis, a job a few seconds
    later. Its claim loop and its blocking fetch both go round once a second, so the fetch's reply tends to arrive
    while a claim is in flight."""
    prefix = f"stall{uuid.uuid4().hex[:8]}:"
    backend = RedisBackend(redis_server.url, prefix=prefix, history=1000, ttl_s=3600)
    queue = RedisJobQueue(redis_server.url, prefix=prefix, group="producers", record_ttl_s=3600)
    settings = ProducerSettings(claim_idle_s=3, renew_s=0.5)
    worker = Worker(settings, backend=backend, queue=queue, providers={"demo": DemoProvider(0)})
    task = asyncio.create_task(worker.run_async())
    try:
        await asyncio.sleep(4)
        job = _job(3)
        await queue.submit(job)
        assert (await settled(queue, job.id, timeout_s=10)).status == "done"
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)
        await queue.aclose()
        await backend.aclose()


async def test_healthz_fails_naming_a_loop_stuck_in_a_call_that_never_returns(
    held_worker: tuple[Worker, HeldClaims], aiohttp_client: Any
) -> None:
    """A claim that never comes back (a Redis reply lost for good) stops the claim loop: /healthz turns 503 and names
    it, so that Kubernetes restarts the worker; the other loops still go round and are not named."""
    worker, queue = held_worker
    client = await aiohttp_client(endpoints_app(worker.metrics.registry, worker.liveness))
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"
    queue.hold = True
    await asyncio.wait_for(queue.held.wait(), 10)
    deadline = time.monotonic() + 20  # the bound is 0.2 s (its period) + 1 s (--stall-after)
    while (resp := await client.get("/healthz")).status == 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    body = await resp.json()
    assert resp.status == 503 and body["status"] == "stuck" and body["stuck"] == ["claim"]
    assert body["loops"]["claim"]["age_s"] > body["loops"]["claim"]["bound_s"]
    text = await (await client.get("/metrics")).text()
    [claim_age] = [
        line for line in text.splitlines() if line.startswith('producer_loop_progress_age_seconds{loop="claim"}')
    ]
    assert float(claim_age.split()[-1]) > 1.2
    queue.let_go.set()  # the call comes back: the loop goes round again, and the worker is live again
    deadline = time.monotonic() + 20
    while (resp := await client.get("/healthz")).status != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_redis_that_does_not_answer_is_not_a_stall_whatever_stall_after_says() -> None:
    """Redis unreachable makes every round of a loop wait for its call's deadline. That is Redis being down (the
    readiness probe's business), not a stuck loop: were it taken for one, Kubernetes would restart every worker.
    So even the smallest --stall-after must not fail liveness while each call waits out its deadline."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts, never answers: every call waits for its deadline

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    timeout_s = 1.0
    queue = RedisJobQueue(url, prefix="down:", group="producers", record_ttl_s=3600, timeout_s=timeout_s)
    # The claim loop goes round every 0.2 s; each of its calls now takes 1 s, five times --stall-after.
    settings = ProducerSettings(claim_idle_s=0.6, renew_s=0.1, poll_s=0.05, stall_after_s=0.2)
    worker = Worker(
        settings,
        backend=MemoryBackend(history=1000, ttl_s=3600),
        queue=queue,
        providers={"demo": DemoProvider(0)},
        store_timeout_s=timeout_s,
    )
    task = asyncio.create_task(worker.run_async())
    try:
        watched_until = time.monotonic() + 4  # several failed claims, each waiting out its deadline
        while time.monotonic() < watched_until:
            assert worker.liveness.stuck() == [], worker.liveness.ages()
            await asyncio.sleep(0.05)
        assert accepted  # the calls did reach the silent server and wait on it
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await queue.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
