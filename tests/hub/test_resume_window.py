"""Resumes served from the node's window of each tailed channel: exact sequences, and no store read for a reconnect
that comes back within the window (a reconnect storm costs the store nothing), on both backends."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ssecore.backend import Backend, ChannelInfo, NewEvent, RangeResult, TailReader
from tests.conftest import ClientFactory
from tests.hub.test_api import publish, subscribe
from tests.support import collect

Client = TestClient[Any, Any]


class CountingBackend:
    """The real backend, with the history reads a subscribe makes counted (what a storm would cost the store)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.ranges = 0
        self.infos = 0

    async def range(self, channel: str, after: str, *, limit: int) -> RangeResult:
        self.ranges += 1
        return await self.inner.range(channel, after, limit=limit)

    async def info(self, channel: str) -> ChannelInfo | None:
        self.infos += 1
        return await self.inner.info(channel)

    async def append(self, channel: str, events: Sequence[NewEvent], *, close: bool = False) -> list[str]:
        return await self.inner.append(channel, events, close=close)

    async def open_reader(self) -> TailReader:
        return await self.inner.open_reader()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def _resumes(client: Client) -> Mapping[str, float]:
    text = await (await client.get("/metrics")).text()
    found = re.finditer(r'^hub_resumes_total\{source="(\w+)"\} (\S+)$', text, re.M)
    return {m.group(1): float(m.group(2)) for m in found}


async def _data(client: Client, channel: str, last_id: str, count: int) -> list[str]:
    resp = await subscribe(client, channel, last_id=last_id)
    evs = await collect(resp, count=count)
    resp.close()
    return [e.data for e in evs]


async def test_reconnect_within_the_window_reads_nothing_from_the_store(
    make_client: ClientFactory, backend: Backend
) -> None:
    counting = CountingBackend(backend)
    client = await make_client(counting)
    keeper = await subscribe(client, "w")  # keeps the channel tailed
    await asyncio.sleep(0.05)
    ids = await publish(client, "w", [{"data": str(i)} for i in range(20)])
    await collect(keeper, count=20)
    counting.ranges = 0
    assert await _data(client, "w", ids[9], 10) == [str(i) for i in range(10, 20)]
    assert counting.ranges == 0
    assert (await _resumes(client)).get("window") == 1
    # A second live subscriber joins at the tail's position: no store read either.
    infos = counting.infos
    late = await subscribe(client, "w")
    await asyncio.sleep(0.05)
    more = await publish(client, "w", {"data": "20"})
    assert [e.id for e in await collect(late, count=1)] == more
    assert counting.infos == infos
    keeper.close()
    late.close()


async def test_storm_of_reconnects_after_everyone_left_is_exact_and_costs_the_store_nothing(
    make_client: ClientFactory, backend: Backend
) -> None:
    counting = CountingBackend(backend)
    client = await make_client(counting, linger_s=30.0)
    channels = [f"storm{i}" for i in range(5)]
    subs = [await subscribe(client, channels[i % 5]) for i in range(40)]
    await asyncio.sleep(0.1)
    for c in channels:
        await publish(client, c, [{"data": str(i)} for i in range(10)])
    last_seen = []
    for resp in subs:
        evs = await collect(resp, count=10)
        last_seen.append(evs[-1].id)
        resp.close()  # every client drops: no subscriber is left on any channel
    await asyncio.sleep(0.2)
    for c in channels:
        await publish(client, c, [{"data": str(i)} for i in range(10, 15)])
    counting.ranges = 0
    results = await asyncio.gather(*(_data(client, channels[i % 5], last_seen[i], 5) for i in range(40)))
    assert all(r == [str(i) for i in range(10, 15)] for r in results)
    assert counting.ranges == 0  # the lingering channels' windows served all 40 resumes
    assert (await _resumes(client)).get("window") == 40


async def test_after_the_linger_a_resume_reads_the_store_and_is_still_exact(
    make_client: ClientFactory, backend: Backend
) -> None:
    counting = CountingBackend(backend)
    client = await make_client(counting, linger_s=0.2, tail_block_s=0.1)
    sub = await subscribe(client, "gone")
    await asyncio.sleep(0.05)
    ids = await publish(client, "gone", [{"data": str(i)} for i in range(6)])
    await collect(sub, count=6)
    sub.close()
    await asyncio.sleep(1.0)  # the linger passes and the tail drops the channel
    await publish(client, "gone", {"data": "6"})
    counting.ranges = 0
    assert await _data(client, "gone", ids[2], 4) == ["3", "4", "5", "6"]
    assert counting.ranges == 1
    assert (await _resumes(client)).get("store") == 1


async def test_first_resume_on_a_cold_channel_seeds_the_window_for_the_next(
    make_client: ClientFactory, backend: Backend
) -> None:
    counting = CountingBackend(backend)
    client = await make_client(counting)
    ids = await publish(client, "cold", [{"data": str(i)} for i in range(10)])
    first = await subscribe(client, "cold", last_id=ids[3])
    assert [e.data for e in await collect(first, count=6)] == [str(i) for i in range(4, 10)]
    counting.ranges = 0
    assert await _data(client, "cold", ids[5], 4) == ["6", "7", "8", "9"]
    assert await _data(client, "cold", ids[3], 6) == [str(i) for i in range(4, 10)]
    assert counting.ranges == 0
    # Older than what the first resume replayed: the store serves it.
    assert await _data(client, "cold", ids[1], 8) == [str(i) for i in range(2, 10)]
    assert counting.ranges == 1
    first.close()


@pytest.mark.parametrize("window", [0, 300, 64 * 1024], ids=["off", "small", "default"])
async def test_resumes_stay_exact_while_publishing_whatever_the_window(
    make_client: ClientFactory, backend: Backend, window: int
) -> None:
    # Subscribers drop and come back at different points while a publisher keeps appending; with no window, a small
    # one that most positions fall out of, or the default, each one's sequence is exact.
    client = await make_client(backend, resume_window_bytes=window, replay_page=7)
    total = 300
    keeper = await subscribe(client, "flow")
    await asyncio.sleep(0.05)

    async def publisher() -> None:
        for i in range(0, total, 3):
            await publish(client, "flow", [{"data": str(j)} for j in range(i, i + 3)])
            await asyncio.sleep(0.002)

    async def hopper(seed: int) -> list[str]:
        got: list[str] = []
        last = "0"
        while len(got) < total:
            resp = await subscribe(client, "flow", last_id=last)
            evs = await collect(resp, count=min(5 + seed, total - len(got)), timeout_s=20)
            resp.close()
            got += [e.data for e in evs]
            last = evs[-1].id
            await asyncio.sleep(0.003 * seed)
        return got

    task = asyncio.create_task(publisher())
    results = await asyncio.gather(*(hopper(s) for s in range(1, 6)))
    await task
    for got in results:
        assert got == [str(i) for i in range(total)]
    keeper.close()


class SlowInfo(CountingBackend):
    """A store whose channel-info reads take a while, as on a busy Redis in a reconnect storm."""

    async def info(self, channel: str) -> ChannelInfo | None:
        self.infos += 1
        await asyncio.sleep(0.1)
        return await self.inner.info(channel)


async def test_live_subscribers_arriving_together_share_one_store_read(
    make_client: ClientFactory, backend: Backend
) -> None:
    slow = SlowInfo(backend)
    client = await make_client(slow)
    await publish(client, "storm", {"data": "before"})
    streams = await asyncio.gather(*(subscribe(client, "storm") for _ in range(20)))
    assert slow.infos == 1  # one read for the twenty, not one each
    ids = await publish(client, "storm", {"data": "after"})
    for stream in streams:
        assert [e.id for e in await collect(stream, count=1)] == ids  # each from now on: nothing older, nothing lost
