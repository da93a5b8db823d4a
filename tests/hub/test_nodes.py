"""Several hub nodes on one real Redis, a node's bounded use of Redis, and a Redis outage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from hub.appkeys import FANOUT
from ssecore.backend import NewEvent
from ssecore.backend_redis import RedisBackend
from tests.conftest import ClientFactory
from tests.hub.test_api import publish, subscribe
from tests.support import RedisServer, collect, read_events


def _redis_backend(server: RedisServer, prefix: str = "nodes:", **kw: Any) -> RedisBackend:
    kw.setdefault("history", 10_000)
    kw.setdefault("ttl_s", 3600.0)
    return RedisBackend(server.url, prefix=prefix, timeout_s=kw.pop("timeout_s", 1.0), **kw)


async def test_publish_on_one_node_resume_and_live_on_another(
    make_client: ClientFactory, redis_server: RedisServer
) -> None:
    a_backend, b_backend = _redis_backend(redis_server, "two:"), _redis_backend(redis_server, "two:")
    try:
        node_a = await make_client(a_backend)
        node_b = await make_client(b_backend)
        live_b = await subscribe(node_b, "shared")
        ids = await publish(node_a, "shared", [{"data": str(i)} for i in range(10)])
        assert [e.id for e in await collect(live_b, count=10)] == ids
        # A client that saw ids[3] on node A resumes on node B with exactly what it missed.
        resumed = await subscribe(node_b, "shared", last_id=ids[3])
        assert [e.data for e in await collect(resumed, count=6)] == [str(i) for i in range(4, 10)]
        more = await publish(node_b, "shared", {"data": "10"})
        assert [e.id for e in await collect(resumed, count=1)] == more
        live_b.close()
        resumed.close()
    finally:
        await a_backend.aclose()
        await b_backend.aclose()


async def test_delete_on_one_node_resets_subscribers_on_another(
    make_client: ClientFactory, redis_server: RedisServer
) -> None:
    a_backend, b_backend = _redis_backend(redis_server, "del:"), _redis_backend(redis_server, "del:")
    try:
        node_a = await make_client(a_backend)
        node_b = await make_client(b_backend)
        await publish(node_a, "gone", {"data": "x"})
        live_b = await subscribe(node_b, "gone")
        await asyncio.sleep(0.1)
        assert (await node_a.delete("/v1/channels/gone")).status == 204
        evs = await collect(live_b)
        assert [e.event for e in evs] == ["reset"]
    finally:
        await a_backend.aclose()
        await b_backend.aclose()


async def test_many_subscribers_share_one_ring_and_few_redis_connections(
    make_client: ClientFactory, redis_server: RedisServer
) -> None:
    admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    backend = _redis_backend(redis_server, "share:")
    try:
        node = await make_client(backend)
        clients_before = int((await admin.info("clients"))["connected_clients"])
        subs = [await subscribe(node, f"room:{i % 4}") for i in range(60)]
        await asyncio.sleep(0.2)
        await admin.config_resetstat()
        for round_ in range(20):
            for room in range(4):
                await publish(node, f"room:{room}", {"data": str(round_)})
        for resp in subs:
            assert [e.data for e in await collect(resp, count=20)] == [str(i) for i in range(20)]
        stats = await admin.info("commandstats")
        xread_calls = int(stats.get("cmdstat_xread", {}).get("calls", 0))
        # 60 subscribers x 80 events, but the node takes each event once, from the ring its append published: no
        # read per event, let alone per subscriber (a few for the periodic sweep at most).
        assert int(stats["cmdstat_evalsha"]["calls"]) == 80
        assert xread_calls <= 5
        clients_after = int((await admin.info("clients"))["connected_clients"])
        assert clients_after - clients_before <= 4
        for resp in subs:
            resp.close()
    finally:
        await backend.aclose()
        await admin.aclose()


async def test_redis_outage_fails_fast_and_node_recovers_by_itself(
    make_client: ClientFactory, own_redis: RedisServer
) -> None:
    backend = _redis_backend(own_redis, "outage:", timeout_s=1.0)
    try:
        node = await make_client(backend)
        ids = await publish(node, "c", {"data": "before"})
        own_redis.stop()
        started = time.monotonic()
        resp = await node.post("/v1/channels/c/events", json={"data": "during"})
        assert resp.status == 503
        body = await resp.json()
        assert body["error"] == "backend_unavailable" and resp.headers["Retry-After"]
        assert time.monotonic() - started < 5  # fails within its deadline, never hangs
        assert (await node.get("/readyz")).status == 503
        assert (await node.get(f"/v1/channels/c/events?last_event_id={ids[0]}")).status == 503
        own_redis.start()  # same port, empty (no persistence in this test)
        deadline = time.monotonic() + 10
        while (await node.get("/readyz")).status != 200:
            assert time.monotonic() < deadline, "node did not become ready after Redis came back"
            await asyncio.sleep(0.1)
        live = await subscribe(node, "c")
        after = await publish(node, "c", {"data": "after"})
        [ev] = await collect(live, count=1)
        assert ev.id == after[0]
        live.close()
    finally:
        await backend.aclose()


async def test_bursts_beyond_the_redis_pool_wait_for_a_connection_instead_of_failing(
    make_client: ClientFactory, redis_server: RedisServer
) -> None:
    backend = _redis_backend(redis_server, "burst:", max_connections=3)
    try:
        node = await make_client(backend)
        ids = await asyncio.gather(*(publish(node, f"b:{i % 5}", {"data": str(i)}) for i in range(60)))
        assert len({(n % 5, i[0]) for n, i in enumerate(ids)}) == 60
        streams = await asyncio.gather(*(subscribe(node, f"b:{i % 5}", query="0") for i in range(60)))
        assert all(s.status == 200 for s in streams)
        for s in streams:
            assert len(await collect(s, count=12)) == 12
            s.close()
    finally:
        await backend.aclose()


async def test_redis_error_replies_are_503_not_500(make_client: ClientFactory, own_redis: RedisServer) -> None:
    admin = aioredis.Redis.from_url(own_redis.url)
    backend = _redis_backend(own_redis, "oom:")
    try:
        node = await make_client(backend)
        await publish(node, "c", {"data": "fits"})
        await admin.config_set("maxmemory", 1)
        resp = await node.post("/v1/channels/c/events", json={"data": "x" * 10_000})
        assert resp.status == 503
        assert (await resp.json())["error"] == "backend_unavailable"
        await admin.config_set("maxmemory", 0)
        info = await (await node.get("/v1/channels/c")).json()
        assert info["length"] == 1  # the refused publish left nothing behind
    finally:
        await backend.aclose()
        await admin.aclose()


@pytest.mark.slow
async def test_live_tail_survives_an_error_reply_and_readiness_tells(
    make_client: ClientFactory, own_redis: RedisServer
) -> None:
    admin = aioredis.Redis.from_url(own_redis.url)
    backend = _redis_backend(own_redis, "wt:")
    try:
        node = await make_client(backend)
        await publish(node, "bad", {"data": "x"})
        bad = await subscribe(node, "bad")
        good = await subscribe(node, "good")
        await asyncio.sleep(0.2)
        # Someone overwrites a channel's key: XREAD now fails with WRONGTYPE for the whole node.
        await admin.delete(backend.keys.stream("bad"))
        await admin.set(backend.keys.stream("bad"), "not a stream")
        await publish(node, "good", {"data": "wake the tail"}, status=201)
        deadline = time.monotonic() + 10
        while (await node.get("/readyz")).status != 503:
            assert time.monotonic() < deadline, "readiness stayed green while the live tail was failing"
            await asyncio.sleep(0.05)
        await admin.delete(backend.keys.stream("bad"))
        while (await node.get("/readyz")).status != 200:
            assert time.monotonic() < deadline + 10, "the live tail did not recover"
            await asyncio.sleep(0.05)
        ids = await publish(node, "good", {"data": "after"})
        evs = await collect(good, count=2)
        assert evs[-1].id == ids[0]
        bad.close()
        good.close()
    finally:
        await backend.aclose()
        await admin.aclose()


async def test_a_store_that_comes_back_without_its_latest_writes_resets_resuming_clients(
    make_client: ClientFactory, own_redis: RedisServer
) -> None:
    """Redis restarts from an older snapshot (as after a failover to a lagging replica) and takes new writes: no client
    may be carried over the lost entries as if nothing happened; each one is told with a `reset`."""
    backend = _redis_backend(own_redis, "lost:", timeout_s=1.0)
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        node = await make_client(backend)
        saved = [(await publish(node, "c", {"data": f"e{i}"}))[0] for i in range(1, 4)]
        await admin.save()  # the snapshot the store comes back from: e1..e3
        live = await subscribe(node, "c", last_id=saved[-1])
        lost = [(await publish(node, "c", {"data": f"e{i}"}))[0] for i in range(4, 7)]
        assert [ev.id for ev in await collect(live, count=3)] == lost
        assert own_redis.proc is not None
        own_redis.proc.kill()  # no shutdown save: e4..e6 are gone with it
        own_redis.proc.wait()
        own_redis.start()
        deadline = time.monotonic() + 10
        while (await node.get("/readyz")).status != 200:
            assert time.monotonic() < deadline, "node did not become ready after Redis came back"
            await asyncio.sleep(0.1)
        [new] = await publish(node, "c", {"data": "e7"})  # appended after e3: ids keep growing, e4..e6 never return

        # The live stream does not carry on with e7 as if it followed e6: the node's tail sees the break and ends the
        # stream; its reconnect from e6 is told.
        assert [ev.id for ev in await collect(live)] == []
        for last in (lost[0], lost[-1]):
            resumed = await subscribe(node, "c", last_id=last)
            events = await collect(resumed, count=5)
            resumed.close()
            assert events[0].event == "reset", (last, events)
            assert orjson.loads(events[0].data) == {
                "reason": "unknown_position",
                "requested": last,
                "continue_after": "0-0",
            }
            # Then what the store holds now, from its start: e1..e3 and e7.
            expected = [*zip(saved, ("e1", "e2", "e3"), strict=True), (new, "e7")]
            assert [(ev.id, ev.data) for ev in events[1:]] == expected
        live.close()
    finally:
        await admin.aclose()
        await backend.aclose()


async def test_a_store_back_without_a_channel_s_latest_writes_ends_its_streams_with_no_new_event(
    make_client: ClientFactory, own_redis: RedisServer
) -> None:
    """As above, but nothing is published afterwards (a generation waiting for its provider, a quiet channel): the
    node does not wait for a next event to notice. Its first sweep after the store came back finds the position it
    delivered last gone, ends the streams, and each one's reconnect is told."""
    backend = _redis_backend(own_redis, "quiet:", timeout_s=1.0)
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        node = await make_client(backend, tail_block_s=0.5)
        saved = [(await publish(node, "c", {"data": f"e{i}"}))[0] for i in range(1, 3)]
        await admin.save()
        live = await subscribe(node, "c", last_id=saved[-1])
        lost = (await publish(node, "c", {"data": "e3"}))[0]
        assert [ev.id for ev in await collect(live, count=1)] == [lost]
        assert own_redis.proc is not None
        own_redis.proc.kill()
        own_redis.proc.wait()
        own_redis.start()
        # The stream ends by itself (collect returns at its end, well within its deadline), having sent nothing more.
        assert [ev.id for ev in await collect(live, timeout_s=20)] == []
        resumed = await subscribe(node, "c", last_id=lost)
        events = await collect(resumed, count=3)
        resumed.close()
        assert events[0].event == "reset" and orjson.loads(events[0].data)["reason"] == "unknown_position"
        assert [(ev.id, ev.data) for ev in events[1:]] == [(saved[0], "e1"), (saved[1], "e2")]
        live.close()
    finally:
        await admin.aclose()
        await backend.aclose()


async def _follow(node: Any, channel: str, received: list[str], resets: list[str], cut: list[int]) -> None:
    """What EventSource does: read until the stream ends, then reconnect with the last id received."""
    while True:
        resp = await subscribe(node, channel, last_id=received[-1] if received else "0")
        try:
            if resp.status == 200:
                async for ev in read_events(resp):
                    if ev.event == "reset":
                        resets.append(ev.data)
                    elif ev.id:
                        received.append(ev.id)
        except aiohttp.ClientError:
            cut.append(len(received))  # ended abruptly: reconnect all the same
        resp.close()
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_redis_down_for_seconds_mid_stream_loses_nothing_it_accepted(make_client: ClientFactory) -> None:
    """Redis (AOF on, fsync always) is killed and started again while a publisher and a subscriber keep going: every
    publish is answered quickly (201, or 503 while Redis is down), readiness tells, and the subscriber ends with
    exactly the accepted events, in order, once each, without the node being restarted."""
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    server.start()
    backend = _redis_backend(server, "aof:", timeout_s=1.0)
    try:
        node = await make_client(backend)
        accepted: list[str] = []
        refused = 0
        slowest_s = 0.0
        readiness: set[int] = set()
        received: list[str] = []
        resets: list[str] = []
        cut: list[int] = []

        async def publisher() -> None:
            nonlocal refused, slowest_s
            for i in range(300):
                started = time.monotonic()
                resp = await node.post("/v1/channels/c/events", json={"data": str(i)})
                slowest_s = max(slowest_s, time.monotonic() - started)
                if resp.status == 201:
                    accepted.extend((await resp.json())["ids"])
                else:
                    assert resp.status == 503, await resp.text()
                    refused += 1
                await asyncio.sleep(0.02)

        async def outage() -> None:
            await asyncio.sleep(1.5)
            assert server.proc is not None
            server.proc.kill()
            server.proc.wait()
            for _ in range(20):
                readiness.add((await node.get("/readyz")).status)
                await asyncio.sleep(0.1)
            server.start()  # same port, same directory: it replays its append-only file

        reading = asyncio.create_task(_follow(node, "c", received, resets, cut))
        await asyncio.wait_for(asyncio.gather(publisher(), outage()), 40)
        deadline = time.monotonic() + 10
        while received != accepted and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the follower's list
            await asyncio.sleep(0.05)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        assert refused > 0 and 503 in readiness  # the outage was real, and readiness said so
        assert len(accepted) > 100  # and publishing went on around it
        assert slowest_s < 5  # refused within the backend's deadline, never hanging
        assert resets == []
        assert received == accepted, (len(received), len(accepted), cut)
        print(f"refused {refused}, accepted {len(accepted)}, streams cut {len(cut)}, slowest {slowest_s:.2f}s")
        assert (await node.get("/readyz")).status == 200
    finally:
        await backend.aclose()
        server.close()


async def _shard_subscribed(admin: aioredis.Redis, pattern: str, count: int, timeout_s: float = 10) -> None:
    """Wait until `count` shard channels matching `pattern` have a subscriber (a node's tail is in force)."""
    deadline = time.monotonic() + timeout_s
    while len(await admin.pubsub_shardchannels(pattern)) < count:
        assert time.monotonic() < deadline, f"no tail subscribed {pattern}"
        await asyncio.sleep(0.05)


async def test_hubs_on_two_databases_of_one_redis_do_not_hear_each_other(
    make_client: ClientFactory, redis_server: RedisServer
) -> None:
    """Same key prefix, databases 0 and 1: their keys are apart, and so must be their live events (shard pub/sub is
    server-wide): a close on one must not end the other's streams, nor a deletion reset them."""
    admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    db1 = redis_server.url.rsplit("/", 1)[0] + "/1"
    a_backend = _redis_backend(redis_server, "tenant:")
    b_backend = RedisBackend(db1, prefix="tenant:", history=10_000, ttl_s=3600.0, timeout_s=1.0)
    try:
        node_a = await make_client(a_backend)
        node_b = await make_client(b_backend)
        await publish(node_a, "gone", {"data": "a0"})
        done_b = await subscribe(node_b, "done")
        gone_b = await subscribe(node_b, "gone")
        await _shard_subscribed(admin, "tenant:ch:{[dg]o*}*", 2)
        # On A: a first event that closes its channel (its ring names 0-0 as the entry before it, as B's empty
        # channel would), and the deletion of a channel B also has.
        await publish(node_a, "done", {"data": "forged", "close": True})
        assert (await node_a.delete("/v1/channels/gone")).status == 204
        b_done = await publish(node_b, "done", [{"data": "b1"}])
        b_gone = await publish(node_b, "gone", [{"data": "b1"}])
        [first_done] = await collect(done_b, count=1)
        [first_gone] = await collect(gone_b, count=1)
        assert (first_done.id, first_done.event, first_done.data) == (b_done[0], "message", "b1")
        assert (first_gone.id, first_gone.event, first_gone.data) == (b_gone[0], "message", "b1")
        # Both streams are still open and live.
        more = await publish(node_b, "done", {"data": "b2"})
        assert [e.id for e in await collect(done_b, count=1)] == more
        done_b.close()
        gone_b.close()
    finally:
        await a_backend.aclose()
        await b_backend.aclose()
        await admin.aclose()


async def _shard_subscribers(admin: aioredis.Redis, ring: str, count: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while (await admin.pubsub_shardnumsub(ring)) != [(ring, count)]:
        assert time.monotonic() < deadline, f"{ring} never had {count} subscribers"
        await asyncio.sleep(0.05)


async def test_a_node_lets_go_of_a_channel_nobody_watches_and_keeps_none_of_its_events(
    make_client: ClientFactory, redis_server: RedisServer
) -> None:
    """A worker goes on writing a generation whose last watcher on this node left: once the linger is over, the node
    holds no subscription for it and buffers none of its events."""
    admin = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    backend = _redis_backend(redis_server, "idle:")
    worker = _redis_backend(redis_server, "idle:")
    try:
        node = await make_client(backend, linger_s=0.2, tail_block_s=0.5)
        ring = backend.keys.ring(backend.keys.stream("gen"))
        live = await subscribe(node, "gen")
        await _shard_subscribers(admin, ring, 1)
        live.close()
        await _shard_subscribers(admin, ring, 0)
        for _ in range(50):
            await worker.append("gen", [NewEvent("message", "x" * 10_000)])
        # The node still serves: a new stream joins and gets what comes next.
        again = await subscribe(node, "gen")
        await _shard_subscribers(admin, ring, 1)
        ids = await worker.append("gen", [NewEvent("message", "next")])
        assert [e.id for e in await collect(again, count=1)] == ids
        again.close()
        await _shard_subscribers(admin, ring, 0)
        for _ in range(50):
            await worker.append("gen", [NewEvent("message", "x" * 10_000)])
        reader: Any = node.app[FANOUT]._reader
        assert reader.subscribed == 0 and reader.buffered_chars == 0
    finally:
        await backend.aclose()
        await worker.aclose()
        await admin.aclose()
