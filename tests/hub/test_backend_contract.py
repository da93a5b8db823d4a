"""The backend contract, run unchanged against MemoryBackend, RedisBackend and RedisBackend on a Redis Cluster (the
`backend_kind` parameter).

Every test that touches a store requests `backend` or `make_backend`, so it runs once per kind; the `check_position`
and `parse_id` cases at the end are pure functions and run once.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence

import pytest

from ssecore.backend import (
    ANY_OWNER,
    TRIM_SLACK_MAX,
    ZERO_ID,
    AppendBatch,
    Appended,
    Backend,
    ChannelClosed,
    ChannelLost,
    ChannelOwned,
    ChannelRewound,
    Entry,
    Fence,
    Fenced,
    Idempotency,
    IdempotencyConflict,
    InvalidPosition,
    NewEvent,
    RangeResult,
    ReadResult,
    Reset,
    check_position,
    format_id,
    parse_id,
)
from tests.conftest import BackendFactory

ID_RE = re.compile(r"(0|[1-9][0-9]*)-(0|[1-9][0-9]*)")
MAX_ID = "18446744073709551615-18446744073709551615"
CH = "chan"


def ev(i: int, event: str = "message") -> NewEvent:
    return NewEvent(event, f"data-{i}")


def evs(start: int, count: int) -> list[NewEvent]:
    return [ev(i) for i in range(start, start + count)]


async def append_each(backend: Backend, channel: str, count: int, start: int = 0) -> list[str]:
    """Append `count` events one call each; return their ids."""
    ids: list[str] = []
    for i in range(start, start + count):
        ids += await backend.append(channel, [ev(i)])
    return ids


async def history(backend: Backend, channel: str, after: str = ZERO_ID, page: int = 1000) -> list[Entry]:
    """Everything retained after `after`, read page by page."""
    out: list[Entry] = []
    while True:
        r = await backend.range(channel, after, limit=page)
        out += r.entries
        if not r.more:
            return out
        after = r.entries[-1].id


def assert_successor(prev: str, nxt: str) -> None:
    """Ids strictly increase; within a millisecond the sequence part counts up by one, a new millisecond starts at 0."""
    p, n = parse_id(prev), parse_id(nxt)
    assert n > p, (prev, nxt)
    if n[0] == p[0]:
        assert n[1] == p[1] + 1, (prev, nxt)
    else:
        assert n[1] == 0, (prev, nxt)


def xfail_for(request: pytest.FixtureRequest, backend_kind: str, kind: str, reason: str) -> None:
    if backend_kind == kind:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


# -- append: ids -------------------------------------------------------------------------------------------------------


async def test_append_returns_ms_seq_ids_whose_ms_part_is_the_append_time(backend: Backend) -> None:
    before = time.time()
    ids = await backend.append(CH, [ev(0), ev(1), ev(2)])
    after = time.time()
    assert len(ids) == 3
    for i in ids:
        assert ID_RE.fullmatch(i), i
        ms = parse_id(i)[0]
        # Same host, so the store's clock and ours agree closely; allow generous slack either side.
        assert before - 2.0 <= ms / 1000 <= after + 2.0


async def test_ids_strictly_increase_within_and_across_appends(backend: Backend) -> None:
    ids: list[str] = []
    for i in range(200):  # a tight loop: many appends share a millisecond, so the sequence part must count up
        ids += await backend.append(CH, [ev(i)])
    ids += await backend.append(CH, evs(200, 100))
    ids += await backend.append(CH, evs(300, 1))
    assert len(ids) == 301
    assert len(set(ids)) == len(ids)
    for prev, nxt in zip(ids, ids[1:], strict=False):
        assert_successor(prev, nxt)
    shared_ms = sum(1 for a, b in zip(ids, ids[1:], strict=False) if parse_id(a)[0] == parse_id(b)[0])
    assert shared_ms > 0, "300 appends in a tight loop should put some in the same millisecond"


async def test_batch_append_stores_events_in_order_with_the_returned_ids(backend: Backend) -> None:
    batch = [NewEvent(f"e{i}", f"d{i}") for i in range(50)]
    ids = await backend.append(CH, batch)
    r = await backend.range(CH, ZERO_ID, limit=100)
    assert [e.id for e in r.entries] == ids
    assert [(e.event, e.data) for e in r.entries] == [(b.event, b.data) for b in batch]
    assert not any(e.close for e in r.entries)
    assert [e.key for e in r.entries] == sorted(parse_id(i) for i in ids)


async def test_channels_are_independent(backend: Backend) -> None:
    a = await backend.append("a", evs(0, 3))
    b = await backend.append("b", evs(10, 2))
    assert [e.data for e in await history(backend, "a")] == ["data-0", "data-1", "data-2"]
    assert [e.data for e in await history(backend, "b")] == ["data-10", "data-11"]
    info_a, info_b = await backend.info("a"), await backend.info("b")
    assert info_a is not None and info_b is not None
    assert (info_a.length, info_a.last_id) == (3, a[-1])
    assert (info_b.length, info_b.last_id) == (2, b[-1])
    await backend.append("a", [ev(3)], close=True)
    info_b = await backend.info("b")
    assert info_b is not None and not info_b.closed
    assert await backend.delete("a")
    assert await backend.info("b") is not None


async def test_ping_succeeds_on_a_reachable_store(backend: Backend) -> None:
    await backend.ping()


# -- range ----------------------------------------------------------------------------------------------------------


async def test_range_is_exclusive_of_after_and_oldest_first(backend: Backend) -> None:
    ids = await append_each(backend, CH, 5)
    r = await backend.range(CH, ids[1], limit=10)
    assert [e.id for e in r.entries] == ids[2:]
    assert [e.data for e in r.entries] == ["data-2", "data-3", "data-4"]
    assert not r.more
    r = await backend.range(CH, ids[-1], limit=10)
    assert r.exists and r.entries == [] and not r.more


@pytest.mark.parametrize("start", ["0", "0-0"])
async def test_range_from_zero_starts_at_the_first_entry(backend: Backend, start: str) -> None:
    ids = await backend.append(CH, evs(0, 4))
    r = await backend.range(CH, start, limit=10)
    assert [e.id for e in r.entries] == ids
    assert not r.more


async def test_range_more_is_true_exactly_when_the_limit_cuts_results(backend: Backend) -> None:
    ids = await backend.append(CH, evs(0, 5))
    for after, limit, expected, more in [
        (ZERO_ID, 4, ids[:4], True),
        (ZERO_ID, 5, ids, False),
        (ZERO_ID, 6, ids, False),
        (ZERO_ID, 1, ids[:1], True),
        (ids[1], 3, ids[2:], False),
        (ids[1], 2, ids[2:4], True),
        (ids[3], 1, ids[4:], False),
        (ids[4], 1, [], False),
    ]:
        r = await backend.range(CH, after, limit=limit)
        assert [e.id for e in r.entries] == expected, (after, limit)
        assert r.more is more, (after, limit)


async def test_paging_through_1000_entries_yields_every_entry_once_in_order(backend: Backend) -> None:
    ids: list[str] = []
    for start in range(0, 1000, 100):
        ids += await backend.append(CH, evs(start, 100))
    got: list[Entry] = []
    after = "0"
    pages = 0
    while True:
        r = await backend.range(CH, after, limit=100)
        pages += 1
        got += r.entries
        if not r.more:
            break
        assert len(r.entries) == 100
        after = r.entries[-1].id
    assert pages == 10
    assert [e.id for e in got] == ids
    assert [e.data for e in got] == [f"data-{i}" for i in range(1000)]
    r = await backend.range(CH, ids[-1], limit=100)
    assert r.entries == [] and not r.more


async def test_range_metadata_reports_ends_and_open_channel(backend: Backend) -> None:
    ids = await backend.append(CH, evs(0, 3))
    r = await backend.range(CH, ids[0], limit=1)
    assert r.exists
    assert r.first_id == ids[0]
    assert r.last_id == ids[-1]
    assert r.max_deleted_id == ZERO_ID
    assert r.closed is False
    await backend.append(CH, [ev(3)], close=True)
    r = await backend.range(CH, ZERO_ID, limit=1)
    assert r.closed is True
    assert r.first_id == ids[0]
    assert r.more


async def test_range_of_missing_channel_does_not_exist(backend: Backend) -> None:
    r = await backend.range("nope", ZERO_ID, limit=10)
    assert r == RangeResult(False, [], False, None, ZERO_ID, ZERO_ID, False)
    r = await backend.range("nope", "1700000000000-5", limit=10)
    assert not r.exists and r.entries == []


# -- info -----------------------------------------------------------------------------------------------------------


async def test_info_reports_length_ends_and_closed(backend: Backend) -> None:
    ids = await backend.append(CH, evs(0, 3))
    info = await backend.info(CH)
    assert info is not None
    assert (info.length, info.first_id, info.last_id, info.closed) == (3, ids[0], ids[-1], False)
    more = await backend.append(CH, [ev(3)], close=True)
    info = await backend.info(CH)
    assert info is not None
    assert (info.length, info.first_id, info.last_id, info.closed) == (4, ids[0], more[0], True)


async def test_info_of_missing_channel_is_none(backend: Backend) -> None:
    assert await backend.info("nope") is None


# -- close ----------------------------------------------------------------------------------------------------------


async def test_close_marks_only_the_last_event_and_the_channel(backend: Backend) -> None:
    first = await backend.append(CH, evs(0, 2))
    closing = await backend.append(CH, evs(2, 3), close=True)
    entries = await history(backend, CH)
    assert [e.id for e in entries] == first + closing
    assert [e.close for e in entries] == [False, False, False, False, True]
    assert entries[-1].data == "data-4"
    info = await backend.info(CH)
    assert info is not None and info.closed and info.last_id == closing[-1]


async def test_close_on_a_new_channel_with_one_event(backend: Backend) -> None:
    ids = await backend.append(CH, [NewEvent("done", "bye")], close=True)
    r = await backend.range(CH, "0", limit=10)
    assert r.closed and r.last_id == ids[0]
    assert r.entries == [Entry(ids[0], "done", "bye", True)]


@pytest.mark.parametrize("close_again", [False, True])
async def test_append_to_a_closed_channel_raises_and_appends_nothing(backend: Backend, close_again: bool) -> None:
    ids = await backend.append(CH, evs(0, 2), close=True)
    with pytest.raises(ChannelClosed):
        await backend.append(CH, evs(2, 3), close=close_again)
    with pytest.raises(ChannelClosed):
        await backend.append(CH, [ev(9)])
    info = await backend.info(CH)
    assert info is not None
    assert (info.length, info.last_id, info.closed) == (2, ids[-1], True)
    assert [e.id for e in await history(backend, CH)] == ids


async def test_a_deleted_closed_channel_can_be_used_again(backend: Backend) -> None:
    await backend.append(CH, evs(0, 2), close=True)
    assert await backend.delete(CH)
    ids = await backend.append(CH, evs(5, 2))
    info = await backend.info(CH)
    assert info is not None
    assert (info.length, info.first_id, info.last_id, info.closed) == (2, ids[0], ids[-1], False)
    assert [e.data for e in await history(backend, CH)] == ["data-5", "data-6"]
    closing = await backend.append(CH, [ev(7)], close=True)
    r = await backend.range(CH, ids[-1], limit=10)
    assert r.closed and [e.id for e in r.entries] == closing and r.entries[0].close


# -- trimming -------------------------------------------------------------------------------------------------------


async def _trimmed_channel(make_backend: BackendFactory) -> tuple[Backend, list[str]]:
    backend = make_backend(history=10)
    return backend, await append_each(backend, CH, 300)


async def test_trimming_keeps_about_history_entries(make_backend: BackendFactory) -> None:
    backend = make_backend(history=10)
    ids: list[str] = []
    lengths: list[int] = []
    for i in range(300):
        ids += await backend.append(CH, [ev(i)])
        info = await backend.info(CH)
        assert info is not None
        lengths.append(info.length)
        assert info.length <= 10 + TRIM_SLACK_MAX
        # Trimmed once the excess reaches min(TRIM_SLACK_MAX, history), so never that much over history.
        assert info.length < 10 + min(TRIM_SLACK_MAX, 10)
        assert info.length >= min(i + 1, 10)
        assert info.last_id == ids[-1]
    assert min(lengths[9:]) == 10
    assert lengths[:10] == list(range(1, 11))
    entries = await history(backend, CH)
    # What is retained is a suffix of what was appended, nothing missing in between.
    assert [e.id for e in entries] == ids[-len(entries) :]
    r = await backend.range(CH, ZERO_ID, limit=1)
    assert r.first_id == entries[0].id
    assert ids.index(r.max_deleted_id) == len(ids) - len(entries) - 1


async def test_a_large_batch_is_trimmed_to_history(make_backend: BackendFactory) -> None:
    backend = make_backend(history=10)
    ids = await backend.append(CH, evs(0, 50))
    r = await backend.range(CH, ZERO_ID, limit=100)
    assert [e.id for e in r.entries] == ids[-10:]
    assert r.max_deleted_id == ids[39]
    assert r.first_id == ids[40] and r.last_id == ids[-1]


async def test_a_trimmed_position_gives_a_trimmed_reset_continuing_before_the_oldest_retained(
    make_backend: BackendFactory,
) -> None:
    backend, ids = await _trimmed_channel(make_backend)
    r = await backend.range(CH, ids[0], limit=100)
    reset = check_position(ids[0], r)
    assert reset is not None
    assert reset.reason == "trimmed"
    assert reset.requested == ids[0]
    assert reset.continue_after == r.max_deleted_id
    assert r.first_id is not None
    assert parse_id(reset.continue_after) < parse_id(r.first_id)
    assert parse_id(ids[0]) < parse_id(reset.continue_after)


async def test_a_position_at_or_after_max_deleted_needs_no_reset(make_backend: BackendFactory) -> None:
    backend, ids = await _trimmed_channel(make_backend)
    r = await backend.range(CH, ZERO_ID, limit=1)
    max_deleted = r.max_deleted_id
    assert max_deleted in ids
    assert max_deleted != ZERO_ID
    start = ids.index(max_deleted)
    for pos in ids[start:]:
        assert check_position(pos, await backend.range(CH, pos, limit=100)) is None, pos
    # Every earlier id fell off the history.
    for pos in ids[:start]:
        reset = check_position(pos, await backend.range(CH, pos, limit=100))
        assert reset is not None and reset.reason == "trimmed", pos


async def test_zero_on_a_trimmed_channel_gives_a_trimmed_reset(make_backend: BackendFactory) -> None:
    backend, _ = await _trimmed_channel(make_backend)
    for start in ("0", ZERO_ID):
        r = await backend.range(CH, start, limit=100)
        reset = check_position(start, r)
        assert reset is not None
        assert (reset.reason, reset.continue_after, reset.requested) == ("trimmed", r.max_deleted_id, start)


async def test_continuing_after_a_trimmed_reset_skips_nothing_retained(make_backend: BackendFactory) -> None:
    backend, ids = await _trimmed_channel(make_backend)
    retained = await history(backend, CH)
    for pos in (ids[0], ids[100], "0"):
        reset = check_position(pos, await backend.range(CH, pos, limit=3))
        assert reset is not None
        r = await backend.range(CH, reset.continue_after, limit=1000)
        assert check_position(reset.continue_after, r) is None
        assert r.entries == retained
        assert r.entries[0].id == r.first_id
        assert [e.id for e in r.entries] == ids[-len(retained) :]


# -- expiry ---------------------------------------------------------------------------------------------------------


async def test_an_idle_channel_expires_and_an_old_position_gets_an_expired_reset(make_backend: BackendFactory) -> None:
    backend = make_backend(ttl_s=0.3)
    ids = await backend.append(CH, evs(0, 3))
    assert await backend.info(CH) is not None
    await asyncio.sleep(0.6)
    assert await backend.info(CH) is None
    r = await backend.range(CH, ids[1], limit=10)
    assert not r.exists and r.entries == []
    reset = check_position(ids[1], r)
    assert reset == Reset("expired", ZERO_ID, ids[1])
    assert await backend.delete(CH) is False


async def test_publishing_refreshes_the_expiry(make_backend: BackendFactory) -> None:
    backend = make_backend(ttl_s=0.6)
    await backend.append(CH, [ev(0)])
    await asyncio.sleep(0.35)
    await backend.append(CH, [ev(1)])
    await asyncio.sleep(0.35)  # 0.7 s after the first append, 0.35 s after the second
    info = await backend.info(CH)
    assert info is not None and info.length == 2
    await asyncio.sleep(0.6)
    assert await backend.info(CH) is None


async def test_a_channel_recreated_after_expiry_resets_an_old_position(make_backend: BackendFactory) -> None:
    backend = make_backend(ttl_s=0.3)
    old = await backend.append(CH, evs(0, 5))
    await asyncio.sleep(0.6)
    new = await backend.append(CH, evs(10, 3))
    assert parse_id(new[0]) > parse_id(old[-1])
    for pos in (old[0], old[2], old[-1]):
        r = await backend.range(CH, pos, limit=100)
        reset = check_position(pos, r)
        assert reset is not None, f"resuming after {pos} would silently skip the new incarnation's start"
        assert reset.reason == "unknown_position"
        assert reset.requested == pos
        r = await backend.range(CH, reset.continue_after, limit=100)
        assert check_position(reset.continue_after, r) is None
        assert [e.id for e in r.entries] == new


# -- unknown positions ----------------------------------------------------------------------------------------------


async def test_a_position_newer_than_anything_generated_gives_unknown_position(backend: Backend) -> None:
    ids = await backend.append(CH, evs(0, 3))
    ms, seq = parse_id(ids[-1])
    for pos in (format_id((ms, seq + 1)), format_id((ms + 1, 0)), format_id((ms + 60_000, 7))):
        r = await backend.range(CH, pos, limit=10)
        assert r.exists and r.entries == [] and not r.more
        reset = check_position(pos, r)
        assert reset is not None, pos
        assert (reset.reason, reset.continue_after, reset.requested) == ("unknown_position", ZERO_ID, pos)


async def test_the_largest_valid_id_as_position_gives_unknown_position(
    backend: Backend, backend_kind: str, request: pytest.FixtureRequest
) -> None:
    await backend.append(CH, evs(0, 2))
    parse_id(MAX_ID)  # accepted as a position
    r = await backend.range(CH, MAX_ID, limit=10)
    assert r.exists and r.entries == []
    reset = check_position(MAX_ID, r)
    assert reset is not None and reset.reason == "unknown_position"


# -- delete ---------------------------------------------------------------------------------------------------------


async def test_delete_returns_true_then_false_and_removes_the_channel(backend: Backend) -> None:
    await backend.append(CH, evs(0, 3))
    assert await backend.delete(CH) is True
    assert await backend.delete(CH) is False
    assert await backend.info(CH) is None
    assert not (await backend.range(CH, ZERO_ID, limit=10)).exists
    assert await backend.delete("never-existed") is False


async def test_a_blocked_reader_reports_a_deleted_channel(backend: Backend) -> None:
    ids = await backend.append(CH, evs(0, 2))
    reader = await backend.open_reader()
    try:
        # A first read establishes the cursor, as the node's tail loop does.
        first = await reader.read({CH: ZERO_ID}, block_s=1.0)
        assert [e.id for e in first.entries[CH]] == ids
        started = time.monotonic()
        task = asyncio.create_task(reader.read({CH: ids[-1]}, block_s=5.0))
        await asyncio.sleep(0.1)
        assert await backend.delete(CH)
        result = await asyncio.wait_for(task, 10)
        assert time.monotonic() - started < 4.5
        assert result.deleted == [CH]
        assert not any(result.entries.values())
        # Reported once, not again.
        again = await reader.read({}, block_s=0.2)
        assert again.deleted == []
    finally:
        await reader.aclose()


async def test_a_reader_reports_a_deletion_made_between_open_and_its_first_read(backend: Backend) -> None:
    ids = await backend.append(CH, evs(0, 2))
    reader = await backend.open_reader()
    try:
        assert await backend.delete(CH)
        # From a position it had delivered: what a node's tail has when a channel with subscribers is deleted.
        # A reader that learns of deletions by polling (Redis Cluster's, whose first read polls) cannot tell this
        # from an expiry: it reports the channel as vanished, and its streams resume to be told by the store.
        result = await reader.read({CH: ids[-1]}, block_s=0.5)
        assert [*result.deleted, *result.vanished] == [CH]
    finally:
        await reader.aclose()


async def test_readers_report_deletions_of_channels_they_were_not_reading(backend: Backend, backend_kind: str) -> None:
    if backend_kind != "memory":
        pytest.skip("on Redis a reader hears only the channels it reads (the only ones a node acts on)")
    await backend.append("a", [ev(0)])
    await backend.append("b", [ev(1)])
    reader_1, reader_2 = await backend.open_reader(), await backend.open_reader()
    try:
        for reader in (reader_1, reader_2):
            await reader.read({"a": ZERO_ID}, block_s=0.05)
        assert await backend.delete("b")
        for reader in (reader_1, reader_2):
            result = await reader.read({}, block_s=2.0)
            assert result.deleted == ["b"]
    finally:
        await reader_1.aclose()
        await reader_2.aclose()


# -- tail reader ----------------------------------------------------------------------------------------------------


async def test_reader_returns_entries_after_the_positions_of_several_channels(backend: Backend) -> None:
    a = await backend.append("a", evs(0, 3))
    b = await backend.append("b", evs(10, 2))
    c = await backend.append("c", evs(20, 1))
    reader = await backend.open_reader()
    try:
        result = await reader.read({"a": a[0], "b": ZERO_ID, "c": c[-1], "missing": ZERO_ID}, block_s=1.0)
        assert [e.id for e in result.entries["a"]] == a[1:]
        assert [e.data for e in result.entries["a"]] == ["data-1", "data-2"]
        assert [e.id for e in result.entries["b"]] == b
        assert result.entries.get("c", []) == []
        assert result.entries.get("missing", []) == []
        assert result.deleted == []
    finally:
        await reader.aclose()


async def test_reader_blocks_up_to_block_s_and_returns_empty_when_nothing_comes(backend: Backend) -> None:
    ids = await backend.append(CH, evs(0, 2))
    reader = await backend.open_reader()
    try:
        started = time.monotonic()
        result = await reader.read({CH: ids[-1], "missing": ZERO_ID}, block_s=0.4)
        elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 3.0
        assert not any(result.entries.values()) and result.deleted == []
    finally:
        await reader.aclose()


@pytest.mark.parametrize("existing", [True, False], ids=["existing-channel", "new-channel"])
async def test_a_concurrent_append_wakes_a_blocked_read_promptly(backend: Backend, existing: bool) -> None:
    position = (await backend.append(CH, evs(0, 1)))[-1] if existing else ZERO_ID
    reader = await backend.open_reader()
    try:
        await reader.read({}, block_s=0.05)
        started = time.monotonic()
        task = asyncio.create_task(reader.read({CH: position}, block_s=5.0))
        await asyncio.sleep(0.1)
        ids = await backend.append(CH, evs(1, 2))
        result = await asyncio.wait_for(task, 10)
        assert time.monotonic() - started < 4.0, "the append should have ended the read well before block_s"
        assert [e.id for e in result.entries[CH]] == ids
    finally:
        await reader.aclose()


async def test_interrupt_makes_a_blocked_read_return_early(backend: Backend) -> None:
    ids = await backend.append(CH, evs(0, 1))
    reader = await backend.open_reader()
    try:
        await reader.read({}, block_s=0.05)
        started = time.monotonic()
        task = asyncio.create_task(reader.read({CH: ids[-1]}, block_s=5.0))
        await asyncio.sleep(0.1)
        await reader.interrupt()
        result = await asyncio.wait_for(task, 10)
        assert time.monotonic() - started < 4.0, "interrupt() should have ended the read well before block_s"
        assert not any(result.entries.values())
        # The reader stays usable.
        more = await backend.append(CH, [ev(1)])
        result = await reader.read({CH: ids[-1]}, block_s=2.0)
        assert [e.id for e in result.entries[CH]] == more
    finally:
        await reader.aclose()


async def test_reading_from_the_last_id_received_loses_nothing_under_concurrent_appends(backend: Backend) -> None:
    total = 500
    produced: list[str] = []

    async def produce() -> None:
        i = 0
        while i < total:
            n = 1 if i % 7 else min(5, total - i)  # mostly single appends, some small batches
            produced.extend(await backend.append(CH, evs(i, n)))
            i += n
            await asyncio.sleep(0)

    reader = await backend.open_reader()
    producer = asyncio.create_task(produce())
    got: list[Entry] = []
    try:
        position = ZERO_ID
        deadline = time.monotonic() + 15
        reads = 0
        while len(got) < total and time.monotonic() < deadline:
            result = await reader.read({CH: position}, block_s=1.0)
            reads += 1
            batch = result.entries.get(CH, [])
            if batch:
                got += batch
                position = batch[-1].id
        await producer
    finally:
        producer.cancel()
        await reader.aclose()
    assert reads > 1
    assert [e.id for e in got] == produced
    assert [e.data for e in got] == [f"data-{i}" for i in range(total)]


# -- data round trip ------------------------------------------------------------------------------------------------

ROUND_TRIP: Sequence[NewEvent] = [
    NewEvent("message", "plain"),
    NewEvent("delta", "line 1\nline 2\n\nline 4\n"),
    NewEvent("crlf", "a\r\nb\rc\r\n"),
    NewEvent("unicode", "héllo wörld 世界 🚀 \u2028 \u00a0 ñ"),
    NewEvent("json", '{"text": "quoted \\"x\\"", "n": [1, 2.5, null]}'),
    NewEvent("empty", ""),
    NewEvent("spaces", "  padded  "),
    NewEvent("tool.call-1:x", "data: looks like a field\nid: 5-5\nevent: fake"),
    NewEvent("big", "chunk of text\n" * 15_000),  # ~210 KB
    NewEvent("big-unicode", "é世🚀" * 25_000),  # ~225 KB of UTF-8
]


async def test_data_and_event_names_round_trip_unchanged(backend: Backend) -> None:
    assert len(ROUND_TRIP[-2].data) >= 200_000
    ids = await backend.append(CH, ROUND_TRIP)
    expected = [(e.event, e.data) for e in ROUND_TRIP]
    r = await backend.range(CH, ZERO_ID, limit=100)
    assert [e.id for e in r.entries] == ids
    assert [(e.event, e.data) for e in r.entries] == expected
    reader = await backend.open_reader()
    try:
        result: ReadResult = await reader.read({CH: ZERO_ID}, block_s=1.0)
        assert [(e.event, e.data) for e in result.entries[CH]] == expected
        # And one at a time, through a blocked read woken by the append.
        for i, event in enumerate(ROUND_TRIP):
            task = asyncio.create_task(reader.read({CH: ids[-1]}, block_s=5.0))
            await asyncio.sleep(0)
            ids += await backend.append(CH, [event], close=i == len(ROUND_TRIP) - 1)
            got = (await asyncio.wait_for(task, 10)).entries[CH]
            assert [(e.id, e.event, e.data) for e in got] == [(ids[-1], event.event, event.data)]
    finally:
        await reader.aclose()
    r = await backend.range(CH, ids[len(ROUND_TRIP) - 1], limit=100)
    assert [(e.event, e.data) for e in r.entries] == expected
    assert r.entries[-1].close and r.closed


# -- check_position and parse_id (pure; no backend) -----------------------------------------------------------------


def rr(
    *,
    exists: bool = True,
    first: str | None = "100-0",
    last: str = "200-0",
    max_deleted: str = ZERO_ID,
    entries: tuple[Entry, ...] = (),
) -> RangeResult:
    return RangeResult(exists, list(entries), False, first, last, max_deleted, False)


@pytest.mark.parametrize(
    ("after", "r", "expected"),
    [
        # From the start.
        ("0", rr(exists=False, first=None, last=ZERO_ID), None),
        ("0-0", rr(), None),
        ("0", rr(max_deleted="50-3"), Reset("trimmed", "50-3", "0")),
        ("0-0", rr(max_deleted="50-3"), Reset("trimmed", "50-3", "0-0")),
        # A channel that is gone.
        ("150-0", rr(exists=False, first=None, last=ZERO_ID), Reset("expired", ZERO_ID, "150-0")),
        # Within what is retained.
        ("100-0", rr(), None),
        ("150-7", rr(), None),
        ("200-0", rr(), None),
        ("150-0", rr(max_deleted="99-9"), None),
        # Exactly at the newest trimmed id: the next entry is the oldest retained one.
        ("99-9", rr(max_deleted="99-9"), None),
        # Trimmed away.
        ("99-8", rr(max_deleted="99-9"), Reset("trimmed", "99-9", "99-8")),
        ("1-0", rr(max_deleted="99-9"), Reset("trimmed", "99-9", "1-0")),
        # Newer than anything generated.
        ("200-1", rr(), Reset("unknown_position", ZERO_ID, "200-1")),
        ("300-0", rr(max_deleted="99-9"), Reset("unknown_position", "99-9", "300-0")),
        # Between what was trimmed and what is retained, or before a recreated stream: never one of its entries.
        ("99-10", rr(max_deleted="99-9"), Reset("unknown_position", "99-9", "99-10")),
        ("50-0", rr(), Reset("unknown_position", ZERO_ID, "50-0")),
        # The next entry was appended right after the position (or after the trimmed one it names): continuous.
        ("150-0", rr(entries=(Entry("160-0", "m", "d", prev="150-0"),)), None),
        ("99-9", rr(max_deleted="99-9", entries=(Entry("100-0", "m", "d", prev="99-9"),)), None),
        ("150-0", rr(entries=(Entry("160-0", "m", "d"),)), None),  # written without `prev`: nothing to compare
        # It was appended after another entry: the store lost the position and what followed it, then took new
        # writes (a restart without persistence, a lagging replica promoted).
        ("150-0", rr(entries=(Entry("160-0", "m", "d", prev="140-0"),)), Reset("unknown_position", ZERO_ID, "150-0")),
        (
            "150-0",
            rr(max_deleted="99-9", entries=(Entry("160-0", "m", "d", prev="140-0"),)),
            Reset("unknown_position", "99-9", "150-0"),
        ),
    ],
)
def test_check_position_on_hand_built_results(after: str, r: RangeResult, expected: Reset | None) -> None:
    assert check_position(after, r) == expected


def test_check_position_rejects_a_malformed_position() -> None:
    with pytest.raises(InvalidPosition):
        check_position("latest", rr())


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("0", (0, 0)),
        ("0-0", (0, 0)),
        ("5-3", (5, 3)),
        ("1700000000000-12", (1700000000000, 12)),
        (MAX_ID, (2**64 - 1,) * 2),
    ],
)
def test_parse_id_accepts_stream_ids(value: str, key: tuple[int, int]) -> None:
    assert parse_id(value) == key
    assert format_id(key) == (value if value != "0" else ZERO_ID)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "$",
        "-",
        "+",
        "abc",
        "1",
        "1-",
        "-1",
        "01-0",
        "1-01",
        "1-2-3",
        " 1-0",
        "1-0 ",
        "18446744073709551616-0",
        "1.5-0",
    ],
)
def test_parse_id_rejects_anything_else(value: str) -> None:
    with pytest.raises(InvalidPosition):
        parse_id(value)


async def test_a_fence_lets_only_the_latest_run_of_one_owner_write(backend: Backend) -> None:
    def batch(data: str, owner: str, attempt: int, take: bool = False, close: bool = False) -> AppendBatch:
        return AppendBatch("fenced", [NewEvent("token", data)], close, Fence(owner, attempt, take))

    [ok] = await backend.append_many([batch("a1", "job-a", 1, take=True)])
    assert isinstance(ok, list)
    [ok] = await backend.append_many([batch("a1-more", "job-a", 1)])
    assert isinstance(ok, list)
    # Another generation cannot take the channel, nor write to it.
    [refused] = await backend.append_many([batch("b", "job-b", 1, take=True)])
    assert isinstance(refused, Fenced)
    # A re-run (attempt 2) takes over; the stalled first run can no longer write, nor take it back.
    [ok] = await backend.append_many([batch("a2", "job-a", 2, take=True)])
    assert isinstance(ok, list)
    [late] = await backend.append_many([batch("a1-late", "job-a", 1)])
    assert isinstance(late, Fenced)
    [late] = await backend.append_many([batch("a1-retake", "job-a", 1, take=True)])
    assert isinstance(late, Fenced)
    [ok] = await backend.append_many([batch("a2-end", "job-a", 2, close=True)])
    assert isinstance(ok, list)
    data = [e.data for e in (await backend.range("fenced", "0", limit=10)).entries]
    assert data == ["a1", "a1-more", "a2", "a2-end"]
    # Unfenced publishing (the HTTP API) is not affected by fences; deleting the channel clears its fence.
    assert await backend.delete("fenced")
    [ok] = await backend.append_many([batch("b", "job-b", 1, take=True)])
    assert isinstance(ok, list)


async def test_a_run_s_append_is_refused_unless_its_last_event_is_still_the_newest(backend: Backend) -> None:
    """Fence.after: a store that lost the run's latest events (a failover) refuses the next append, writing nothing,
    so the run is re-run rather than continued over a hole. The memory backend loses nothing, but keeps the rule."""
    take = Fence("job", 1, take=True)
    [first] = await backend.append_many(
        [AppendBatch("run", [NewEvent("token", "a"), NewEvent("token", "b")], fence=take)]
    )
    assert isinstance(first, list)
    [ok] = await backend.append_many(
        [AppendBatch("run", [NewEvent("token", "c")], fence=Fence("job", 1, after=first[1]))]
    )
    assert isinstance(ok, list)
    # As if the store no longer held "c": the run's next append names "b" as its last, and the newest is "c".
    [refused] = await backend.append_many(
        [AppendBatch("run", [NewEvent("token", "d")], fence=Fence("job", 1, after=first[1]))]
    )
    assert isinstance(refused, ChannelRewound)
    assert [e.data for e in (await backend.range("run", "0", limit=10)).entries] == ["a", "b", "c"]
    [ok] = await backend.append_many([AppendBatch("run", [NewEvent("token", "d")], fence=Fence("job", 1, after=ok[0]))])
    assert isinstance(ok, list)


# -- generations' channels -----------------------------------------------------------------------------------------


async def test_a_reserved_channel_takes_only_fenced_appends_and_says_whose_it_is(backend: Backend) -> None:
    assert await backend.owner("gen:a") is None
    assert await backend.reserve("gen:a", "jwt:alice")
    assert await backend.owner("gen:a") == "jwt:alice"
    assert await backend.info("gen:a") is None  # reserved, not yet written: still no channel
    assert not await backend.reserve("gen:a", "jwt:bob")  # taken: nothing changes
    assert await backend.owner("gen:a") == "jwt:alice"
    with pytest.raises(ChannelOwned):
        await backend.append("gen:a", [ev(0)])
    with pytest.raises(ChannelOwned):
        await backend.append_once("gen:a", [ev(0)], Idempotency("k", "f"))
    [refused] = await backend.append_many([AppendBatch("gen:a", [ev(0)])])
    assert isinstance(refused, ChannelOwned)
    [ok] = await backend.append_many([AppendBatch("gen:a", [ev(1)], fence=Fence("gen_a", 1, take=True))])
    assert isinstance(ok, list)
    assert [e.data for e in (await backend.range("gen:a", "0", limit=10)).entries] == [ev(1).data]
    # A channel that exists cannot become a generation's; deleting one frees its name.
    await backend.append("plain", [ev(0)])
    assert not await backend.reserve("plain", "jwt:alice") and await backend.owner("plain") is None
    assert await backend.delete("gen:a") and await backend.owner("gen:a") is None
    await backend.append("gen:a", [ev(2)])


async def test_a_channel_s_owner_lives_as_long_as_the_channel(make_backend: BackendFactory) -> None:
    backend = make_backend(ttl_s=0.6)
    assert await backend.reserve("gen:b", "jwt:alice")
    await asyncio.sleep(0.35)
    [ok] = await backend.append_many([AppendBatch("gen:b", [ev(0)], fence=Fence("gen_b", 1, take=True))])
    assert isinstance(ok, list)
    await asyncio.sleep(0.35)  # past the reservation's first lifetime: the append refreshed it
    assert await backend.owner("gen:b") == "jwt:alice"
    await asyncio.sleep(0.6)
    assert await backend.owner("gen:b") is None and await backend.info("gen:b") is None


async def test_reserving_a_name_rings_no_reader_and_deleting_it_unwritten_keeps_its_owner(backend: Backend) -> None:
    reader = await backend.open_reader()
    try:
        await reader.read({"gen:c": ZERO_ID}, block_s=0.05)  # tailing it, as a node with a stream on it does
        waiting = asyncio.create_task(reader.read({"gen:c": ZERO_ID}, block_s=0.6))
        await asyncio.sleep(0.1)
        assert await backend.reserve("gen:c", "jwt:alice")
        # Nothing for the streams already on the name: their right to it is settled when the first entries come.
        assert await waiting == ReadResult()
    finally:
        await reader.aclose()
    # Deleting a name with no stream yet deletes nothing: its queued job still writes it, and writes it owned.
    assert not await backend.delete("gen:c")
    assert await backend.owner("gen:c") == "jwt:alice"
    with pytest.raises(ChannelOwned):
        await backend.append("gen:c", [ev(0)])


async def test_release_undoes_only_its_own_reserve_of_a_name_nothing_wrote(backend: Backend) -> None:
    assert not await backend.release("gen:r", "jwt:alice")  # nobody's
    assert await backend.reserve("gen:r", "jwt:alice")
    assert not await backend.release("gen:r", "jwt:bob") and await backend.owner("gen:r") == "jwt:alice"
    assert await backend.release("gen:r", "jwt:alice") and await backend.owner("gen:r") is None
    assert await backend.reserve("gen:r", "jwt:bob")  # the name is free again

    # Once its worker has written it (a submit that timed out but landed), the channel stays its owner's.
    assert await backend.reserve("gen:w", "jwt:alice")
    [ok] = await backend.append_many([AppendBatch("gen:w", [ev(0)], fence=Fence("gen_w", 1, take=True))])
    assert isinstance(ok, list)
    assert not await backend.release("gen:w", "jwt:alice")
    assert await backend.owner("gen:w") == "jwt:alice"
    with pytest.raises(ChannelOwned):
        await backend.append("gen:w", [ev(1)])


async def test_a_delete_conditioned_on_an_owner_deletes_only_while_that_owner_holds_the_channel(
    backend: Backend,
) -> None:
    # A plain channel: deleted when no owner is expected, not when one is (it became no one's generation).
    await backend.append("plain", [ev(0)])
    assert not await backend.delete("plain", owner="jwt:alice")
    assert await backend.delete("plain", owner=None)
    # A generation's channel: kept (and still its owner's) unless the expected owner is its owner.
    assert await backend.reserve("gen:d", "jwt:alice")
    [ok] = await backend.append_many([AppendBatch("gen:d", [ev(0)], fence=Fence("gen_d", 1, take=True))])
    assert isinstance(ok, list)
    assert not await backend.delete("gen:d", owner=None)  # authorized while the name was no one's
    assert not await backend.delete("gen:d", owner="jwt:bob")
    assert await backend.owner("gen:d") == "jwt:alice" and await backend.info("gen:d") is not None
    assert await backend.delete("gen:d", owner="jwt:alice")
    assert await backend.owner("gen:d") is None and await backend.info("gen:d") is None
    # Without a condition, whoever owns it.
    assert await backend.reserve("gen:e", "jwt:alice")
    [ok] = await backend.append_many([AppendBatch("gen:e", [ev(0)], fence=Fence("gen_e", 1, take=True))])
    assert isinstance(ok, list)
    assert await backend.delete("gen:e", owner=ANY_OWNER)


async def test_a_take_that_names_the_channel_s_owner_writes_only_while_that_owner_holds_it(backend: Backend) -> None:
    def take(channel: str, owner: str | None, attempt: int = 1) -> AppendBatch:
        return AppendBatch(channel, [ev(attempt)], fence=Fence(f"job-{channel}", attempt, True, owner))

    # The reservation was undone (a submit that seemed to fail but landed): its job writes nothing, not even an
    # unowned channel, and the name stays free.
    assert await backend.reserve("gen:lost", "jwt:alice")
    assert await backend.release("gen:lost", "jwt:alice")
    [refused] = await backend.append_many([take("gen:lost", "jwt:alice")])
    assert isinstance(refused, ChannelLost)
    assert await backend.info("gen:lost") is None and await backend.owner("gen:lost") is None
    # Another client's generation took the name meanwhile: not this job's to write either.
    assert await backend.reserve("gen:lost", "jwt:bob")
    [refused] = await backend.append_many([take("gen:lost", "jwt:alice")])
    assert isinstance(refused, ChannelLost)
    assert await backend.info("gen:lost") is None and await backend.owner("gen:lost") == "jwt:bob"
    # The owner's mark present: the take writes; a re-run's take after the channel was deleted does not.
    assert await backend.reserve("gen:kept", "jwt:alice")
    [ok] = await backend.append_many([take("gen:kept", "jwt:alice")])
    assert isinstance(ok, list)
    assert await backend.delete("gen:kept")
    [refused] = await backend.append_many([take("gen:kept", "jwt:alice", attempt=2)])
    assert isinstance(refused, ChannelLost)
    assert await backend.info("gen:kept") is None
    # A job that names no owner (queued by a hub that kept none) is not checked.
    [ok] = await backend.append_many([take("gen:old", None)])
    assert isinstance(ok, list)


# -- idempotent appends ---------------------------------------------------------------------------------------------


async def test_an_append_retried_with_its_key_appends_nothing_and_answers_the_same_ids(backend: Backend) -> None:
    key = Idempotency("req-1", "f1")
    first = await backend.append_once(CH, evs(0, 3), key)
    assert not first.replayed and len(first.ids) == 3
    again = await backend.append_once(CH, evs(0, 3), key)
    assert again == Appended(first.ids, True)
    assert [e.id for e in await history(backend, CH)] == first.ids
    # Another key is another request; a key is scoped to its channel.
    other = await backend.append_once(CH, evs(0, 3), Idempotency("req-2", "f1"))
    elsewhere = await backend.append_once("other", evs(0, 3), key)
    assert not other.replayed and not elsewhere.replayed
    assert len(await history(backend, CH)) == 6 and len(await history(backend, "other")) == 3


async def test_a_key_reused_for_other_events_is_refused_and_appends_nothing(backend: Backend) -> None:
    first = await backend.append_once(CH, evs(0, 1), Idempotency("req", "f1"))
    with pytest.raises(IdempotencyConflict):
        await backend.append_once(CH, evs(5, 1), Idempotency("req", "f2"))
    assert [e.id for e in await history(backend, CH)] == first.ids


async def test_the_retry_of_a_closing_append_is_answered_not_refused_as_closed(backend: Backend) -> None:
    key = Idempotency("closing", "f")
    first = await backend.append_once(CH, evs(0, 2), key, close=True)
    assert await backend.append_once(CH, evs(0, 2), key, close=True) == Appended(first.ids, True)
    with pytest.raises(ChannelClosed):
        await backend.append_once(CH, evs(0, 2), Idempotency("new", "f"), close=True)


async def test_concurrent_requests_with_one_key_append_once(backend: Backend) -> None:
    key = Idempotency("race", "f")
    results = await asyncio.gather(*(backend.append_once(CH, evs(0, 2), key) for _ in range(20)))
    assert sum(not r.replayed for r in results) == 1
    assert len({tuple(r.ids) for r in results}) == 1
    assert len(await history(backend, CH)) == 2


async def test_a_key_is_forgotten_after_the_idempotency_window(make_backend: BackendFactory) -> None:
    backend = make_backend(idempotency_window_s=0.3)
    key = Idempotency("req", "f")
    first = await backend.append_once(CH, evs(0, 1), key)
    await asyncio.sleep(0.6)
    later = await backend.append_once(CH, evs(0, 1), key)
    assert not later.replayed and later.ids != first.ids
    assert len(await history(backend, CH)) == 2
