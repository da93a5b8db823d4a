"""A generation belongs to the client that started it: others cannot read, cancel, delete or even see it, nobody
publishes into its channel, and each client has only so many generations queued or running at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp.test_utils import TestClient

from hub.appkeys import FANOUT, JOBS
from producer.settings import ProducerSettings
from ssecore.backend import AppendBatch, Backend, BackendUnavailable, Fence, NewEvent
from ssecore.jobs import GenerationRecord, Job, TooManyGenerations
from ssecore.queue_redis import RedisJobQueue
from ssecore.sse import SSEEvent
from tests.conftest import ClientFactory
from tests.support import RedisServer, collect, read_events, settled

Client = TestClient[Any, Any]
SECRET = "s" * 64
API_KEY = "svc-key-0123456789abcdef"
SLOW = {"provider": "demo", "model": "demo", "messages": [{"role": "user", "content": "hi"}]}  # seconds at 10 tokens/s
QUICK = {**SLOW, "params": {"max_tokens": 2}}


def bearer(sub: str, *, subscribe: list[str] | None = None, publish: list[str] | None = None) -> dict[str, str]:
    claims = {"sub": sub, "exp": time.time() + 600, "subscribe": subscribe or [], "publish": publish or []}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


ALICE = bearer("alice", subscribe=["gen:*"], publish=["gen:*"])
BOB = bearer("bob", subscribe=["gen:*"], publish=["gen:*"])
AUTH: dict[str, Any] = {"anonymous": False, "jwt_secret": SECRET, "api_keys": f"svc {API_KEY} gen:*"}


@pytest.fixture(params=["memory", "redis"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def hub(make_client: ClientFactory, backend: Backend) -> Client:
    return await make_client(backend, **AUTH)


async def start(hub: Client, headers: dict[str, str], body: dict[str, Any] = SLOW) -> dict[str, Any]:
    resp = await hub.post("/v1/generations", json=body, headers=headers)
    job: dict[str, Any] = await resp.json()
    assert resp.status == 202, job
    return job


async def answer(resp: aiohttp.ClientResponse) -> tuple[int, Any]:
    return resp.status, await resp.json()


async def events_within(resp: aiohttp.ClientResponse, seconds: float) -> list[SSEEvent]:
    """What a stream delivers within `seconds` (it may stay open)."""
    out: list[SSEEvent] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for ev in read_events(resp):
                out.append(ev)
    resp.close()
    return out


async def preamble(hub: Client, channel: str, headers: dict[str, str]) -> bytes:
    """The first bytes of a live stream: the position it starts from."""
    resp = await hub.get(f"/v1/channels/{channel}/events", headers=headers)
    assert resp.status == 200
    data = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            async for chunk in resp.content.iter_any():
                data += chunk
    resp.close()
    return data


async def until_done(hub: Client, job: dict[str, Any], headers: dict[str, str]) -> list[SSEEvent]:
    resp = await hub.get(job["events_url"] + "?last_event_id=0", headers=headers)
    assert resp.status == 200
    return await collect(resp, timeout_s=30)  # ends by itself at the terminal event


async def test_another_client_with_a_wildcard_cannot_reach_a_generation_nor_tell_it_exists(hub: Client) -> None:
    job = await start(hub, ALICE, QUICK)
    gid, channel = job["id"], job["channel"]
    events = await until_done(hub, job, ALICE)
    assert [e.event for e in events][-1] == "done"

    unknown_id, unknown_channel = "gen_" + "0" * 24, "gen:gen_" + "0" * 24
    for method in ("GET", "DELETE"):
        theirs = await answer(await hub.request(method, f"/v1/generations/{gid}", headers=BOB))
        assert theirs == await answer(await hub.request(method, f"/v1/generations/{unknown_id}", headers=BOB))
        assert theirs[0] == 404
        theirs = await answer(await hub.request(method, f"/v1/channels/{channel}", headers=BOB))
        assert theirs == await answer(await hub.request(method, f"/v1/channels/{unknown_channel}", headers=BOB))
        assert theirs[0] == 404
    # Streams: answered as a channel that does not exist, from the same position, and nothing ever comes.
    assert await preamble(hub, channel, BOB) == await preamble(hub, unknown_channel, BOB)
    resp = await hub.get(f"/v1/channels/{channel}/events?last_event_id=0", headers=BOB)
    assert resp.status == 200 and await events_within(resp, 1.5) == []

    # The owner still reaches all of it (Bob's DELETE removed nothing).
    assert (await hub.get(f"/v1/generations/{gid}", headers=ALICE)).status == 200
    assert (await hub.get(f"/v1/channels/{channel}", headers=ALICE)).status == 200
    assert [e.event for e in await until_done(hub, job, ALICE)] == [e.event for e in events]
    assert (await hub.delete(f"/v1/channels/{channel}", headers=ALICE)).status == 204


async def test_a_token_that_names_the_channel_exactly_reaches_the_generation(hub: Client) -> None:
    job = await start(hub, ALICE, QUICK)
    gid, channel = job["id"], job["channel"]
    reader = bearer("carol", subscribe=[channel])
    events = await until_done(hub, job, reader)
    assert [e.event for e in events][0] == "start" and events[-1].event == "done"
    assert (await hub.get(f"/v1/generations/{gid}", headers=reader)).status == 200
    assert (await hub.get(f"/v1/channels/{channel}", headers=reader)).status == 200
    # Reading is not cancelling: that takes the channel named in `publish`.
    assert (await hub.delete(f"/v1/generations/{gid}", headers=reader)).status == 404

    running = await start(hub, ALICE)
    canceller = bearer("carol", publish=[running["channel"]])
    resp = await hub.delete(f"/v1/generations/{running['id']}", headers=canceller)
    assert resp.status == 202, await resp.text()
    done = await until_done(hub, running, ALICE)
    assert done[-1].event == "done" and "cancelled" in done[-1].data
    assert (await hub.delete(f"/v1/channels/{running['channel']}", headers=canceller)).status == 204


async def test_another_client_cannot_cancel_a_running_generation(hub: Client) -> None:
    job = await start(hub, ALICE)
    assert (await hub.delete(f"/v1/generations/{job['id']}", headers=BOB)).status == 404
    assert (await hub.delete(f"/v1/channels/{job['channel']}", headers=BOB)).status == 404
    record = await (await hub.get(f"/v1/generations/{job['id']}", headers=ALICE)).json()
    assert record["status"] in ("queued", "running") and "owner" not in record
    assert (await hub.delete(f"/v1/generations/{job['id']}", headers=ALICE)).status == 202


async def _refused_publish(hub: Client, channel: str, headers: dict[str, str], **extra: str) -> None:
    resp = await hub.post(f"/v1/channels/{channel}/events", json={"data": "forged"}, headers={**headers, **extra})
    body = await resp.json()
    assert (resp.status, body["error"]) == (409, "generation_channel"), body


async def test_nobody_publishes_into_a_generation_channel_even_before_its_worker_starts(
    make_client: ClientFactory, backend: Backend
) -> None:
    # No worker: the channel is only reserved, the moment between a submit and the worker's first append.
    hub = await make_client(backend, embedded_worker="off", **AUTH)
    job = await start(hub, ALICE)
    channel = job["channel"]
    for headers in (ALICE, BOB, bearer("carol", publish=[channel]), {"Authorization": f"Bearer {API_KEY}"}):
        await _refused_publish(hub, channel, headers)
        await _refused_publish(hub, channel, headers, **{"Idempotency-Key": uuid.uuid4().hex})
    assert (await hub.get(f"/v1/channels/{channel}", headers=ALICE)).status == 404  # nothing was written


async def test_nobody_publishes_into_a_running_generation_channel(hub: Client) -> None:
    job = await start(hub, ALICE)
    channel = job["channel"]
    resp = await hub.get(job["events_url"] + "?last_event_id=0", headers=ALICE)
    assert [e.event for e in await collect(resp, count=1)] == ["start"]
    resp.close()
    for headers in (ALICE, bearer("carol", publish=[channel]), {"Authorization": f"Bearer {API_KEY}"}):
        await _refused_publish(hub, channel, headers)
    events = await until_done(hub, job, ALICE)
    assert "forged" not in [e.data for e in events]


async def _first_block(resp: aiohttp.ClientResponse) -> None:
    """Wait for a live stream's opening (its position): the stream is then attached, or about to be."""
    assert resp.status == 200
    async with asyncio.timeout(10):
        while b"id: " not in await resp.content.readuntil(b"\n\n"):
            pass


async def _until_tailed(hub: Client, channel: str) -> None:
    for _ in range(200):  # 10 s
        if hub.app[FANOUT].live_position(channel) is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{channel} is never tailed")


async def test_streams_opened_before_the_generation_took_its_name_get_what_their_client_may_read(hub: Client) -> None:
    channel = f"gen:custom-{uuid.uuid4().hex[:8]}"
    alice_early = await hub.get(f"/v1/channels/{channel}/events", headers=ALICE)
    bob_early = await hub.get(f"/v1/channels/{channel}/events", headers=BOB)
    for resp in (alice_early, bob_early):
        await _first_block(resp)
    await _until_tailed(hub, channel)
    # The node already follows the name: the creator's own streamed answer joins that feed, and gets all of it.
    created = await hub.post(
        "/v1/generations", json={**QUICK, "channel": channel}, headers={**ALICE, "Accept": "text/event-stream"}
    )
    assert created.status == 200
    own = await collect(created, timeout_s=30)
    assert own[0].event == "start" and own[-1].event == "done", own
    assert [e.data for e in await collect(alice_early, timeout_s=30)] == [e.data for e in own]
    assert await events_within(bob_early, 1.5) == []  # still open, and nothing of Alice's ever came


def _answer_late(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the first owner lookup read the store at once and answer only when the second event is set (the first
    is set when it is asked): the race of a request checked just before its name became a generation's."""
    asked, reply = asyncio.Event(), asyncio.Event()
    real_owner = backend.owner

    async def late_owner(name: str) -> str | None:
        owner = await real_owner(name)
        if not asked.is_set():
            asked.set()
            await reply.wait()
        return owner

    monkeypatch.setattr(backend, "owner", late_owner)
    return asked, reply


async def _write_as_worker(backend: Backend, channel: str, gid: str, *events: str) -> None:
    batch = AppendBatch(channel, [NewEvent(e, "{}") for e in events], events[-1] == "done", Fence(gid, 1, True))
    [ids] = await backend.append_many([batch])
    assert isinstance(ids, list)


async def test_the_info_of_a_name_that_becomes_a_generation_meanwhile_is_not_told(
    make_client: ClientFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = await make_client(backend, embedded_worker="off", **AUTH)
    channel = f"gen:custom-{uuid.uuid4().hex[:8]}"
    asked, reply = _answer_late(backend, monkeypatch)
    bob_request = asyncio.create_task(hub.get(f"/v1/channels/{channel}", headers=BOB))
    async with asyncio.timeout(10):
        await asyncio.wait([asyncio.ensure_future(asked.wait()), bob_request], return_when=asyncio.FIRST_COMPLETED)
    if asked.is_set():  # the owner was asked before the stream was read: let the generation begin meanwhile
        job = await start(hub, ALICE, {**SLOW, "channel": channel})
        await _write_as_worker(backend, channel, job["id"], "start")
        reply.set()
    assert await answer(await bob_request) == (404, {"error": "channel_not_found", "message": "no such channel"})


@pytest.mark.parametrize("answered", ["before the first entry", "after the first entry"])
async def test_a_stream_admitted_just_before_the_generation_took_its_name_gets_none_of_it(
    make_client: ClientFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch, answered: str
) -> None:
    # No worker: the test writes the channel as its worker would, so that each step happens in a known order.
    hub = await make_client(backend, embedded_worker="off", **AUTH)
    channel = f"gen:custom-{uuid.uuid4().hex[:8]}"
    asked, reply = _answer_late(backend, monkeypatch)
    bob_request = asyncio.create_task(hub.get(f"/v1/channels/{channel}/events", headers=BOB))
    async with asyncio.timeout(10):
        await asyncio.wait([asyncio.ensure_future(asked.wait()), bob_request], return_when=asyncio.FIRST_COMPLETED)
    assert asked.is_set()
    job = await start(hub, ALICE, {**SLOW, "channel": channel})
    alice = await hub.get(f"/v1/channels/{channel}/events?last_event_id=0", headers=ALICE)
    assert alice.status == 200

    async def write(*events: str) -> None:
        await _write_as_worker(backend, channel, job["id"], *events)

    if answered == "after the first entry":
        await write("start")
        assert [e.event for e in await collect(alice, count=1)] == ["start"]
        reply.set()
        await _first_block(await bob_request)  # caught up: its catch-up read found the channel written
    else:
        reply.set()
        await _first_block(await bob_request)
        await asyncio.sleep(0.2)  # attached before any entry: the fan-out settles it at the first dispatch
        await write("start")
    await write("token", "done")
    assert [e.event for e in await collect(alice, timeout_s=10)][-2:] == ["token", "done"]
    assert await events_within(bob_request.result(), 1.5) == []


async def test_deleting_a_generation_channel_before_its_worker_wrote_it_leaves_it_its_owner_s(
    make_client: ClientFactory, backend: Backend
) -> None:
    hub = await make_client(backend, embedded_worker="off", **AUTH)
    job = await start(hub, ALICE)
    channel = job["channel"]
    for headers in (ALICE, {"Authorization": f"Bearer {API_KEY}"}):
        assert (await hub.delete(f"/v1/channels/{channel}", headers=headers)).status == 404  # nothing written yet
    # Still the generation's: nobody publishes into it (a forged `done`), and its worker will write it owned.
    await _refused_publish(hub, channel, BOB)
    assert await backend.owner(channel) == "jwt:alice"


async def test_a_delete_let_in_before_the_name_became_a_generation_s_does_not_delete_the_generation(
    make_client: ClientFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = await make_client(backend, embedded_worker="off", **AUTH)
    channel = f"gen:custom-{uuid.uuid4().hex[:8]}"
    asked, reply = _answer_late(backend, monkeypatch)
    bob_request = asyncio.create_task(hub.delete(f"/v1/channels/{channel}", headers=BOB))
    async with asyncio.timeout(10):
        await asyncio.wait([asyncio.ensure_future(asked.wait()), bob_request], return_when=asyncio.FIRST_COMPLETED)
    assert asked.is_set()  # Bob's pattern reaches the name, which is no one's yet: he is let in
    job = await start(hub, ALICE, {**SLOW, "channel": channel})
    await _write_as_worker(backend, channel, job["id"], "start")
    reply.set()
    assert await answer(await bob_request) == (404, {"error": "channel_not_found", "message": "no such channel"})
    info = await backend.info(channel)
    assert info is not None and info.length == 1 and await backend.owner(channel) == "jwt:alice"


async def test_a_generation_whose_submit_seemed_to_fail_never_writes_a_channel_others_can_reach(
    make_client: ClientFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The queue took the job, but its answer was lost (a timeout): the hub undoes the reservation and answers 503,
    # while a worker runs the job. It must not write the name as an unowned channel, for any pattern to read.
    hub = await make_client(backend, **AUTH)
    jobs = hub.app[JOBS]
    real_submit = jobs.submit
    submitted: list[Job] = []

    async def landed_but_timed_out(job: Job, *, max_active: int = 0) -> GenerationRecord:
        submitted.append(job)
        await real_submit(job, max_active=max_active)
        raise BackendUnavailable("redis unavailable: TimeoutError")

    monkeypatch.setattr(jobs, "submit", landed_but_timed_out)
    assert (await hub.post("/v1/generations", json=QUICK, headers=ALICE)).status == 503
    [job] = submitted
    monkeypatch.undo()
    record = await settled(jobs, job.id, timeout_s=30)
    assert record.status == "error" and record.error is not None and record.error["code"] == "channel_lost"
    assert await backend.info(job.channel) is None and await backend.owner(job.channel) is None
    # The owner's slot is free again, and the next generation runs.
    assert [e.event for e in await until_done(hub, await start(hub, ALICE, QUICK), ALICE)][-1] == "done"


async def test_anonymous_mode_keeps_everyone_one_principal(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend)
    job = await start(hub, {}, QUICK)
    assert (await hub.get(f"/v1/generations/{job['id']}")).status == 200
    assert [e.event for e in await until_done(hub, job, {})][-1] == "done"
    assert (await hub.delete(f"/v1/channels/{job['channel']}")).status == 204


# -- generations per client ---------------------------------------------------------------------------------------


async def _status(hub: Client, gid: str, headers: dict[str, str]) -> str:
    record: dict[str, Any] = await (await hub.get(f"/v1/generations/{gid}", headers=headers)).json()
    return str(record["status"])


async def _wait_status(hub: Client, gid: str, headers: dict[str, str], wanted: set[str]) -> None:
    for _ in range(600):  # 30 s
        if await _status(hub, gid, headers) in wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{gid} never reached {wanted}")


async def _refused_generation(hub: Client, headers: dict[str, str]) -> None:
    resp = await hub.post("/v1/generations", json=SLOW, headers=headers)
    body = await resp.json()
    assert resp.status == 429 and body["error"] == body["limit"] == "max_generations_per_client", body
    assert "Retry-After" in resp.headers


def _rejections(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('hub_limit_rejections_total{limit="max_generations_per_client"}'):
            return float(line.split()[-1])
    return 0.0


async def _two_hubs(make_client: ClientFactory, redis_url: str | None, **settings: Any) -> tuple[Client, Client]:
    """Two nodes: with Redis, sharing it (the first runs the worker); without, the same app twice."""
    worker = ProducerSettings(metrics_port=0, demo_tokens_per_s=10, poll_s=0.05)
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    common = {**AUTH, "redis_url": redis_url, "key_prefix": prefix, **settings}
    a = await make_client(worker_settings=worker, **{"embedded_worker": "on" if redis_url else "auto", **common})
    if redis_url is None:
        return a, a
    b = await make_client(**{**common, "embedded_worker": "off"})
    return a, b


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_client_has_at_most_so_many_generations_queued_or_running(
    make_client: ClientFactory, redis_server: RedisServer, store: str
) -> None:
    a, b = await _two_hubs(make_client, redis_server.url if store == "redis" else None, max_generations_per_client=2)
    first, second = await start(a, ALICE), await start(b, ALICE)  # counted over every node
    await _refused_generation(a, ALICE)
    await _refused_generation(b, ALICE)
    assert _rejections(await (await a.get("/metrics")).text()) >= 1
    other = await start(b, BOB)  # a limit per client, not for all
    # A cancelled generation frees its slot once it has ended.
    assert (await b.delete(f"/v1/generations/{first['id']}", headers=ALICE)).status == 202
    await _wait_status(a, first["id"], ALICE, {"cancelled"})
    third = await start(a, ALICE)
    await _refused_generation(b, ALICE)
    # So does one that finished.
    for job, who in ((second, ALICE), (third, ALICE), (other, BOB)):
        assert (await a.delete(f"/v1/generations/{job['id']}", headers=who)).status == 202
        await _wait_status(a, job["id"], who, {"cancelled"})
    quick = await start(b, ALICE, QUICK)
    await _wait_status(a, quick["id"], ALICE, {"done"})
    await start(a, ALICE)
    await start(b, ALICE)
    await _refused_generation(a, ALICE)


async def test_zero_means_no_limit(make_client: ClientFactory) -> None:
    hub, _ = await _two_hubs(make_client, None, max_generations_per_client=0, embedded_worker="off")
    for _ in range(20):
        await start(hub, ALICE)


async def test_owners_are_kept_beside_jobs_and_records_so_workers_that_know_none_still_read_them(
    redis_server: RedisServer,
) -> None:
    # A rolling upgrade runs hubs and workers of two versions at once: a job or record whose JSON held a field the
    # older one does not know would be unreadable there (and an unreadable job is dropped).
    queue = RedisJobQueue(redis_server.url, prefix=f"test:{uuid.uuid4().hex[:12]}:", group="g", record_ttl_s=60)
    try:
        job = Job("gen_1", "demo", "demo", [{"role": "user", "content": "hi"}], "gen:gen_1", owner="jwt:alice")
        await queue.submit(job, max_active=1)
        with pytest.raises(TooManyGenerations):
            await queue.submit(dataclasses.replace(job, id="gen_2", channel="gen:gen_2"), max_active=1)
        [delivery] = await queue.fetch("c", 10, 1.0)
        assert delivery.job == job
        raw = await queue._redis.xrange(queue.keys.jobs)
        assert "owner" not in orjson.loads(raw[0][1]["j"])
        assert "owner" not in orjson.loads(await queue._redis.hget(queue.keys.record("gen_1"), "r"))
        record = await queue.get("gen_1")
        assert record is not None and record.owner == "jwt:alice"
        record.status = "done"
        await queue.update(record)
        updated = await queue.get("gen_1")
        assert updated is not None and updated.owner == "jwt:alice" and updated.status == "done"
        await queue.submit(dataclasses.replace(job, id="gen_3", channel="gen:gen_3"), max_active=1)  # slot freed
    finally:
        await queue.aclose()
