"""Each Lua script of ssecore/scripts on its own, run with EVAL on a real redis-server, as its comments describe it:
the keys and arguments it takes, what it writes, what it answers and what it refuses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ssecore import scripts
from ssecore.backend import TRIM_SLACK_MAX
from tests.support import RedisServer

APPEND = scripts.load("append", TRIM_SLACK=TRIM_SLACK_MAX)


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def k() -> str:
    """A fresh key prefix: each test's keys are its own on the shared server."""
    return f"t{uuid.uuid4().hex[:8]}:"


def _keys(k: str, channel: str = "c", idem: str | None = None) -> list[str]:
    keys = [f"{k}ch:{{{channel}}}", f"{k}fence:{{{channel}}}", f"{k}owner:{{{channel}}}"]
    return [*keys, f"{k}idem:{{{channel}}}:{idem}"] if idem else keys


def _args(
    *events: str,
    maxlen: int = 1000,
    close: bool = False,
    fence: tuple[str, str, int] = ("", "", 0),
    idem: tuple[str, int] = ("", 0),
    expect_owner: str = "",
    after: str = "",
) -> list[Any]:
    args: list[Any] = [maxlen, 60_000, "1" if close else "0", *fence, *idem, "", expect_owner, after]
    for data in events:
        args += ("message", data)
    return args


async def append(r: Any, keys: list[str], args: list[Any]) -> Any:
    return await r.eval(APPEND, len(keys), *keys, *args)


def test_every_script_is_shipped_and_a_constant_that_is_not_there_is_an_error() -> None:
    for name in ("append", "range", "delete", "reserve", "release", "renew", "keep_slot", "take_slot"):
        assert scripts.load(name).strip()
    assert f"local TRIM_SLACK = {TRIM_SLACK_MAX}" in APPEND
    with pytest.raises(KeyError):
        scripts.load("range", TRIM_SLACK=1)


# -- append -----------------------------------------------------------------------------------------------------------


async def test_append_chains_each_entry_to_the_one_before_and_refuses_after_the_close(r: Any, k: str) -> None:
    keys = _keys(k)
    first = await append(r, keys, _args("a", "b"))
    second = await append(r, keys, _args("c", close=True))
    entries = await r.xrange(keys[0])
    assert [e[0] for e in entries] == first + second
    assert [e[1]["p"] for e in entries] == ["0-0", first[0], first[1]]
    assert "c" in entries[-1][1] and "c" not in entries[0][1]
    with pytest.raises(ResponseError, match="^CLOSED"):
        await append(r, keys, _args("d"))
    assert 0 < await r.pttl(keys[0]) <= 60_000


async def test_append_rings_the_stream_s_shard_channel_with_what_it_added(r: Any, k: str) -> None:
    keys = _keys(k)
    pubsub = r.pubsub()
    await pubsub.execute_command("SSUBSCRIBE", keys[0])
    await pubsub.get_message(timeout=1)  # the subscription's confirmation
    ids = await append(r, keys, _args("x", "y"))
    message = None
    for _ in range(20):
        message = await pubsub.get_message(timeout=0.5)
        if message and message["type"] == "smessage":
            break
    assert message is not None
    assert orjson.loads(message["data"]) == ["0-0", "0", ids[0], "message", "x", ids[1], "message", "y"]
    await pubsub.aclose()


async def test_append_trims_in_batches_and_records_the_newest_trimmed_id(r: Any, k: str) -> None:
    keys = _keys(k)
    ids = [(await append(r, keys, _args(f"e{i}", maxlen=5)))[0] for i in range(10)]
    # Once min(TRIM_SLACK, maxlen) = 5 over the limit, trimmed back to 5; the id of the last one removed is kept.
    assert await r.xlen(keys[0]) == 5
    info = await r.xinfo_stream(keys[0])
    assert info["max-deleted-entry-id"] == ids[4]
    assert info["first-entry"][0] == ids[5]
    # Then not on every append: slack until the excess is a batch again.
    await append(r, keys, _args("one more", maxlen=5))
    assert await r.xlen(keys[0]) == 6


async def test_append_to_an_owned_channel_needs_its_fence(r: Any, k: str) -> None:
    keys = _keys(k)
    await r.set(keys[2], "ip:1")
    with pytest.raises(ResponseError, match="^OWNED"):
        await append(r, keys, _args("a"))
    # A take that expects another owner writes nothing.
    with pytest.raises(ResponseError, match="^LOST"):
        await append(r, keys, _args("a", fence=("take", "job", 1), expect_owner="ip:2"))
    [taken] = await append(r, keys, _args("a", fence=("take", "job", 1), expect_owner="ip:1"))
    # Held: a later attempt takes it over; the earlier can no longer write.
    await append(r, keys, _args("b", fence=("take", "job", 2)))
    with pytest.raises(ResponseError, match="^FENCED"):
        await append(r, keys, _args("c", fence=("check", "job", 1)))
    with pytest.raises(ResponseError, match="^FENCED"):
        await append(r, keys, _args("c", fence=("take", "other", 9)))
    assert [e[1]["d"] for e in await r.xrange(keys[0])] == ["a", "b"]
    assert taken


async def test_append_with_after_refuses_when_the_run_s_last_event_is_not_the_newest(r: Any, k: str) -> None:
    keys = _keys(k)
    [a] = await append(r, keys, _args("a", fence=("take", "job", 1)))
    [b] = await append(r, keys, _args("b", fence=("check", "job", 1), after=a))
    await r.xdel(keys[0], b)  # the store lost it
    with pytest.raises(ResponseError, match="^REWOUND"):
        await append(r, keys, _args("c", fence=("check", "job", 1), after=b))
    assert [e[1]["d"] for e in await r.xrange(keys[0])] == ["a"]


async def test_append_with_an_idempotency_key_answers_a_retry_with_the_first_ids(r: Any, k: str) -> None:
    keys = _keys(k, idem="key")
    first = await append(r, keys, _args("a", "b", idem=("digest", 60_000)))
    again = await append(r, keys, _args("a", "b", idem=("digest", 60_000)))
    assert again == ["=", *first]
    assert await r.xlen(keys[0]) == 2
    with pytest.raises(ResponseError, match="^IDEMPOTENCY"):
        await append(r, keys, _args("other", idem=("another digest", 60_000)))


# -- range ------------------------------------------------------------------------------------------------------------


async def test_range_reads_history_and_metadata_atomically_even_while_writes_are_paused(
    r: Any, k: str, redis_server: RedisServer
) -> None:
    keys = _keys(k)
    range_lua = scripts.load("range")
    assert await r.eval(range_lua, 1, keys[0], "(0-0", 10) == [0]  # no such stream
    ids = await append(r, keys, _args("a", "b", close=True))
    exists, length, last_id, max_deleted, first_id, closed, entries = await r.eval(
        range_lua, 1, keys[0], f"({ids[0]}", 10
    )
    assert (exists, length, last_id, max_deleted, first_id, closed) == (1, 2, ids[1], "0-0", ids[0], 1)
    assert [e[0] for e in entries] == [ids[1]]
    # Flagged no-writes: it runs while a failover pauses writes (a script that may write would wait).
    admin: Any = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await admin.execute_command("CLIENT", "PAUSE", 2000, "WRITE")
        reply = await asyncio.wait_for(r.eval(range_lua, 1, keys[0], "(0-0", 0), 1.5)
        assert reply[:2] == [1, 2]
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()


# -- delete, reserve, release -----------------------------------------------------------------------------------------


async def test_delete_takes_the_channel_its_fence_and_owner_and_rings_d(r: Any, k: str) -> None:
    keys = _keys(k)
    delete = scripts.load("delete")
    await append(r, keys, _args("a", fence=("take", "job", 1)))
    await r.set(keys[2], "ip:1")
    # Only if the owner is the one named.
    assert await r.eval(delete, 3, *keys, "", "1", "ip:2") == 0
    pubsub = r.pubsub()
    await pubsub.execute_command("SSUBSCRIBE", keys[0])
    await pubsub.get_message(timeout=1)
    assert await r.eval(delete, 3, *keys, "", "1", "ip:1") == 1
    assert await r.exists(*keys) == 0
    message = None
    for _ in range(20):
        message = await pubsub.get_message(timeout=0.5)
        if message and message["type"] == "smessage":
            break
    assert message is not None and message["data"] == "d"
    await pubsub.aclose()
    # A name without a stream (reserved, not yet written) keeps its owner.
    await r.set(keys[2], "ip:1")
    assert await r.eval(delete, 3, *keys, "", "0", "") == 0
    assert await r.get(keys[2]) == "ip:1"


async def test_reserve_only_a_free_name_and_release_only_one_s_own_unwritten_reservation(r: Any, k: str) -> None:
    stream, _, owner = _keys(k)
    reserve, release = scripts.load("reserve"), scripts.load("release")
    assert await r.eval(reserve, 2, stream, owner, "ip:1", 60_000) == 1
    assert await r.eval(reserve, 2, stream, owner, "ip:2", 60_000) == 0  # taken
    assert await r.eval(release, 2, stream, owner, "ip:2") == 0  # not its own
    assert await r.eval(release, 2, stream, owner, "ip:1") == 1
    assert await r.exists(owner) == 0
    await r.eval(reserve, 2, stream, owner, "ip:1", 60_000)
    await r.xadd(stream, {"e": "message", "d": "x", "p": "0-0"})
    assert await r.eval(release, 2, stream, owner, "ip:1") == 0  # written: it stays the owner's
    assert await r.eval(reserve, 2, stream, owner, "ip:3", 60_000) == 0  # a stream that exists is not free


# -- the job queue's --------------------------------------------------------------------------------------------------


async def test_renew_keeps_only_the_jobs_this_consumer_still_holds(r: Any, k: str) -> None:
    jobs = f"{k}jobs"
    await r.xgroup_create(jobs, "g", id="0", mkstream=True)
    mine, taken = await r.xadd(jobs, {"j": "1"}), await r.xadd(jobs, {"j": "2"})
    await r.xreadgroup("g", "w1", {jobs: ">"}, count=2)
    await r.xclaim(jobs, "g", "w2", 0, [taken])  # taken over by another worker
    lost = await r.eval(scripts.load("renew"), 1, jobs, "g", "w1", mine, taken)
    assert lost == [taken]
    pending = await r.xpending_range(jobs, "g", min="-", max="+", count=10)
    assert {(p["message_id"], p["consumer"]) for p in pending} == {(mine, "w1"), (taken, "w2")}


async def test_a_client_takes_at_most_its_limit_of_slots_and_lapsed_ones_free_up(r: Any, k: str) -> None:
    slots = f"{k}active:{{ip:1}}"
    take, keep = scripts.load("take_slot"), scripts.load("keep_slot")
    assert await r.eval(take, 1, slots, 2, 60_000, "g1") == 1
    assert await r.eval(take, 1, slots, 2, 60_000, "g2") == 1
    assert await r.eval(take, 1, slots, 2, 60_000, "g3") == 0  # at the limit
    # A slot whose lifetime ran out no longer counts.
    assert await r.eval(keep, 1, slots, 1, "g1") == 1  # g1 now lapses in 1 ms
    await asyncio.sleep(0.05)
    assert await r.eval(take, 1, slots, 2, 60_000, "g3") == 1
    assert set(await r.zrange(slots, 0, -1)) == {"g2", "g3"}
