"""The publish path's pipelined Redis connection (ssecore.redis_pipe) and the ring-fed live tail, on real redis-servers:
order under concurrency, a script cache that was flushed, a server that dies or stops answering, AUTH and SELECT
from the URL, and rings that cannot be trusted."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from ssecore.backend import ZERO_ID, AppendBatch, BackendUnavailable, ChannelClosed, NewEvent, TailReader, parse_id
from ssecore.backend_redis import RedisBackend
from ssecore.redis_pipe import RedisPipe
from tests.support import RedisServer


@dataclass
class Tail:
    """A backend on the test's own Redis, an admin client of that Redis, and a tail reader of the backend."""

    backend: RedisBackend
    admin: Any
    reader: TailReader


@pytest.fixture
async def tail(own_redis: RedisServer) -> AsyncIterator[Tail]:
    backend = _backend(own_redis.url)
    admin: Any = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    reader = await backend.open_reader()
    try:
        yield Tail(backend, admin, reader)
    finally:
        await reader.aclose()
        await backend.aclose()
        await admin.aclose()


def _backend(url: str, *, timeout_s: float = 5.0) -> RedisBackend:
    return RedisBackend(url, prefix=f"pipe:{uuid.uuid4().hex[:8]}:", history=10_000, ttl_s=600, timeout_s=timeout_s)


def ev(i: int) -> list[NewEvent]:
    return [NewEvent("message", str(i))]


async def test_concurrent_appends_share_the_connection_and_keep_the_order_they_were_made_in(
    tail: Tail,
) -> None:
    backend, admin = tail.backend, tail.admin
    clients_before = int((await admin.info("clients"))["connected_clients"])
    await backend.append("warm", ev(0))  # connected, and the script known to the server
    results = await asyncio.gather(*(backend.append(f"c{i % 3}", ev(i)) for i in range(300)))
    # Made in one turn of the loop, they leave in one write, in order: per channel, ids grow in call order.
    for c in range(3):
        ids = [parse_id(r[0]) for i, r in enumerate(results) if i % 3 == c]
        assert ids == sorted(ids) and len(set(ids)) == 100
        stored = await admin.xrange(backend.keys.stream(f"c{c}"))
        assert [f["d"] for _, f in stored] == [str(i) for i in range(c, 300, 3)]
    # One connection for all of them, not a pool's worth.
    assert int((await admin.info("clients"))["connected_clients"]) - clients_before == 1


async def test_a_flushed_script_cache_costs_nothing_and_appends_once(tail: Tail) -> None:
    backend, admin = tail.backend, tail.admin
    await backend.append("c", ev(0))
    await admin.script_flush()  # as after a restart or a failover to a server that never saw the script
    ids = await asyncio.gather(*(backend.append("c", ev(i)) for i in range(1, 6)))
    assert len({i[0] for i in ids}) == 5
    assert [f["d"] for _, f in await admin.xrange(backend.keys.stream("c"))] == [str(i) for i in range(6)]


async def test_a_server_that_dies_fails_calls_at_once_and_the_next_call_reconnects(own_redis: RedisServer) -> None:
    backend = _backend(own_redis.url, timeout_s=2.0)
    try:
        await backend.append("c", ev(0))
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await backend.append("c", ev(1))
        assert time.monotonic() - started < 1.5
        own_redis.start()
        assert await backend.append("c", ev(2))
    finally:
        await backend.aclose()


async def test_a_server_that_stops_answering_fails_calls_at_their_deadline_then_recovers(
    own_redis: RedisServer,
) -> None:
    backend = _backend(own_redis.url, timeout_s=0.5)
    admin: Any = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    assert own_redis.proc is not None
    try:
        await backend.append("c", ev(0))
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(backend.append("c", ev(i)) for i in range(1, 4)), return_exceptions=True)
            waited = time.monotonic() - started
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert all(isinstance(r, BackendUnavailable) for r in results), results
        assert 0.4 <= waited < 2.0
        # The stuck connection was dropped; a fresh one serves the next call. The calls that timed out may or may not
        # have run (their replies were never read): a 503 says so, and an Idempotency-Key makes the retry safe.
        assert await backend.append("c", ev(9))
        data = [f["d"] for _, f in await admin.xrange(backend.keys.stream("c"))]
        assert data[0] == "0" and data[-1] == "9"
    finally:
        await backend.aclose()
        await admin.aclose()


async def test_auth_and_database_come_from_the_url() -> None:
    server = RedisServer("--requirepass", "s3cret")
    server.start()
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        backend = _backend(url)
        admin: Any = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            [entry_id] = await backend.append("c", ev(1))
            assert [i for i, _ in await admin.xrange(backend.keys.stream("c"))] == [entry_id]
        finally:
            await backend.aclose()
            await admin.aclose()
        wrong = _backend(f"redis://:nope@127.0.0.1:{server.port}/3")
        try:
            with pytest.raises(BackendUnavailable):
                await wrong.append("c", ev(2))
        finally:
            await wrong.aclose()
    finally:
        server.close()


def test_only_plain_tcp_and_unix_socket_urls_take_the_pipe() -> None:
    assert RedisPipe.supports("redis://h:1/0") and RedisPipe.supports("unix:///tmp/r.sock")
    assert not RedisPipe.supports("rediss://h:1/0")


async def test_a_ring_out_of_step_with_the_reader_is_not_delivered_the_stream_is_read_instead(
    tail: Tail,
) -> None:
    backend, admin, reader = tail.backend, tail.admin, tail.reader
    [first] = await backend.append("c", ev(0))
    result = await reader.read({"c": ZERO_ID}, block_s=1.0)
    assert [e.id for e in result.entries["c"]] == [first]
    # An entry that reached the stream without its ring (as if the ring was lost): the next ring's entries do not
    # follow the reader's position, so they must not be delivered as they are.
    lost = await admin.xadd(backend.keys.stream("c"), {"e": "message", "d": "lost", "p": first})
    await backend.append("c", ev(2))
    got: list[str] = []
    position = first
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        result = await reader.read({"c": position}, block_s=1.0)
        for e in result.entries.get("c", []):
            assert e.prev == position, "delivered entries must continue from the reader's position"
            got.append(e.data)
            position = e.id
    assert got == ["lost", "2"]
    assert lost != first


async def test_rings_deliver_without_reading_the_stream(tail: Tail) -> None:
    backend, admin, reader = tail.backend, tail.admin, tail.reader
    [first] = await backend.append("c", ev(0))
    position = ZERO_ID
    result = await reader.read({"c": position}, block_s=30.0)  # subscribes, and reads from the position once
    position = result.entries["c"][-1].id
    assert position == first
    await admin.config_resetstat()
    for i in range(1, 21):
        await backend.append("c", ev(i))
        result = await reader.read({"c": position}, block_s=30.0)
        [entry] = result.entries["c"]
        assert entry.data == str(i) and entry.prev == position
        position = entry.id
    stats = await admin.info("commandstats")
    assert "cmdstat_xread" not in stats


async def test_a_ring_that_carries_no_entries_is_followed_by_a_read_not_a_failure(tail: Tail) -> None:
    backend, reader = tail.backend, tail.reader
    [first] = await backend.append("c", ev(0))
    result = await reader.read({"c": ZERO_ID}, block_s=30.0)
    assert [e.id for e in result.entries["c"]] == [first]
    assert await backend.append("c", []) == []  # an append of nothing still rings, with no entries
    result = await reader.read({"c": first}, block_s=1.0)  # woken by that ring: reads, finds nothing
    assert not result.entries.get("c")
    [second] = await backend.append("c", ev(1))
    got: list[str] = []
    position = first
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        result = await reader.read({"c": position}, block_s=1.0)
        got += [e.id for e in result.entries.get("c", [])]
    assert got == [second]


async def test_a_lost_subscribing_connection_costs_latency_never_entries(tail: Tail) -> None:
    backend, admin, reader = tail.backend, tail.admin, tail.reader
    position = ZERO_ID
    got: list[str] = []

    async def read_until(n: int) -> None:
        nonlocal position
        deadline = time.monotonic() + 10
        while len(got) < n:
            assert time.monotonic() < deadline, got
            try:
                result = await reader.read({"c": position}, block_s=0.5)
            except BackendUnavailable:
                continue  # the reader starts afresh: subscribes again and reads from its position
            for e in result.entries.get("c", []):
                assert e.prev == position
                got.append(e.data)
                position = e.id

    await backend.append("c", ev(0))
    await read_until(1)
    # Redis drops the node's subscribing connection; what is appended meanwhile rings nobody.
    assert await admin.client_kill_filter(_type="pubsub") >= 1
    for i in range(1, 6):
        await backend.append("c", ev(i))
    await read_until(6)
    await backend.append("c", ev(6))  # and the rings reach it again
    await read_until(7)
    assert got == [str(i) for i in range(7)]


async def test_a_producer_flush_is_answered_per_channel_even_after_a_script_cache_flush(tail: Tail) -> None:
    backend, admin = tail.backend, tail.admin
    await backend.append("closed", ev(0), close=True)
    await admin.script_flush()
    results = await backend.append_many(
        [AppendBatch("a", ev(1)), AppendBatch("closed", ev(2)), AppendBatch("b", [*ev(3), *ev(4)])]
    )
    assert isinstance(results[0], list) and len(results[0]) == 1
    assert isinstance(results[1], ChannelClosed)
    assert isinstance(results[2], list) and len(results[2]) == 2
    for channel, data in (("a", ["1"]), ("closed", ["0"]), ("b", ["3", "4"])):
        assert [f["d"] for _, f in await admin.xrange(backend.keys.stream(channel))] == data


async def _longest_stall(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this task, until `stop`."""
    worst, last = 0.0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        worst, last = max(worst, now - last), now
    return worst


async def test_a_deletion_ring_of_a_channel_no_longer_tailed_neither_stalls_the_node_nor_haunts_its_next_incarnation(
    tail: Tail,
) -> None:
    backend, reader = tail.backend, tail.reader
    [a] = await backend.append("A", ev(0))
    await backend.append("C", ev(0), close=True)
    result = await reader.read({"A": ZERO_ID, "C": ZERO_ID}, block_s=30.0)  # both subscribed
    assert set(result.entries) == {"A", "C"}
    # C ended, so the node stops tailing it; it is deleted, and the `d` comes before the node unsubscribes.
    await backend.delete("C")
    await asyncio.sleep(0.1)
    stop = asyncio.Event()
    watch = asyncio.create_task(_longest_stall(stop))
    await asyncio.sleep(0.02)
    result = await reader.read({"A": a}, block_s=1.0)
    stop.set()
    assert await watch < 0.5, "a read must not hold the event loop"
    assert result.deleted == []
    # A new channel C, tailed later, is not reported deleted.
    [c2] = await backend.append("C", ev(1))
    result = await reader.read({"A": a, "C": c2}, block_s=0.5)
    assert result.deleted == []


async def test_a_subscribing_connection_lost_between_reads_fails_the_next_read_at_once(tail: Tail) -> None:
    backend, admin, reader = tail.backend, tail.admin, tail.reader
    [a] = await backend.append("A", ev(0))
    assert (await reader.read({"A": ZERO_ID}, block_s=30.0)).entries
    await reader.read({"A": a}, block_s=0.2)
    assert await admin.client_kill_filter(_type="pubsub") >= 1
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await reader.read({"A": a}, block_s=30.0)
    assert time.monotonic() - started < 1.0  # not at the end of the block, or at the next sweep


async def test_callers_waiting_for_a_connection_share_one_attempt_and_its_deadline() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts, never answers (the SELECT the URL asks for hangs)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipe = RedisPipe(f"redis://127.0.0.1:{port}/1", timeout_s=0.3)
    started = time.monotonic()

    async def one() -> float:
        with pytest.raises(BackendUnavailable):
            await pipe.call("PING")
        return time.monotonic() - started

    try:
        waited = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(10))), 30)
        assert max(waited) < 1.0, waited  # one deadline for all, not one after another
        assert len(accepted) == 1  # and one connection attempt
    finally:
        await pipe.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_user_without_the_ring_channels_stores_appends_once_and_its_tail_says_why(
    own_redis: RedisServer,
) -> None:
    admin: Any = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    await admin.execute_command("ACL", "SETUSER", "hub", "on", ">pw", "~*", "+@all", "resetchannels")
    backend = _backend(f"redis://hub:pw@127.0.0.1:{own_redis.port}/0")
    reader = await backend.open_reader()
    try:
        # The ring is refused after the entry is stored: the append still succeeds, so a retry cannot store it twice.
        [entry_id] = await backend.append("c", ev(0))
        assert [i for i, _ in await admin.xrange(backend.keys.stream("c"))] == [entry_id]
        # The tail cannot subscribe: it fails, with the reason, rather than wait for rings that never come.
        with pytest.raises(BackendUnavailable, match="NOPERM"):
            await reader.read({"c": ZERO_ID}, block_s=30.0)
    finally:
        await reader.aclose()
        await backend.aclose()
        await admin.aclose()


async def test_the_rings_one_channel_may_hold_between_reads_are_bounded(tail: Tail) -> None:
    """A burst of rings while nobody reads (a busy node, a reader between reads) costs a read from the store, not
    memory without bound; nothing is lost."""
    backend, reader = tail.backend, tail.reader
    positions = {"c": ZERO_ID, "probe": ZERO_ID}
    await reader.read(positions, block_s=0)  # both subscribed, and read once
    ids = []
    for _ in range(40):  # 4 MB of rings, twice the bound
        ids += await backend.append("c", [NewEvent("message", "x" * 100_000)])
    await backend.append("probe", ev(0))
    # The rings of one subscribing connection arrive in order: once the probe's has come, all of c's have.
    internals: Any = reader
    deadline = time.monotonic() + 20
    probe_key = backend.keys.stream("probe")
    while probe_key not in internals._pushed and probe_key not in internals._rang:
        assert time.monotonic() < deadline, "the probe's ring never came"
        await asyncio.sleep(0.02)
    held = sum(len(e.data) for e in internals._pushed.get(backend.keys.stream("c"), []))
    assert held <= 2 * 1024 * 1024
    got: list[str] = []
    while len(got) < len(ids):
        result = await reader.read({**positions, "c": got[-1] if got else ZERO_ID}, block_s=5)
        got += [e.id for e in result.entries.get("c", [])]
    assert got == ids


async def test_a_read_of_no_channels_lets_go_of_every_subscription(tail: Tail) -> None:
    backend, admin, reader = tail.backend, tail.admin, tail.reader
    ring = backend.keys.ring(backend.keys.stream("c"))
    await reader.read({"c": ZERO_ID}, block_s=0)
    assert (await admin.pubsub_shardnumsub(ring)) == [(ring, 1)]
    await reader.read({}, block_s=0)
    deadline = time.monotonic() + 10
    while (await admin.pubsub_shardnumsub(ring)) != [(ring, 0)]:
        assert time.monotonic() < deadline, "the reader kept its subscription"
        await asyncio.sleep(0.02)
