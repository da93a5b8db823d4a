"""The producer's coalescer: when a batch goes, and what it stores."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from producer.coalesce import Coalescer
from producer.metrics import ProducerMetrics
from ssecore.backend import AppendBatch, BackendError, Fence, NewEvent
from ssecore.backend_memory import MemoryBackend


class SlowStore(MemoryBackend):
    """The memory backend, each flush taking `flush_s`: a store under load. Records when each flush started."""

    def __init__(self, flush_s: float) -> None:
        super().__init__(history=1000, ttl_s=3600)
        self.flush_s = flush_s
        self.flushes: list[tuple[float, list[str]]] = []

    async def append_many(self, batches: Sequence[AppendBatch]) -> list[list[str] | BackendError]:
        loop = asyncio.get_running_loop()
        self.flushes.append((loop.time(), [e.data for b in batches for e in b.events]))
        await asyncio.sleep(self.flush_s)
        return await super().append_many(batches)


async def test_events_that_waited_behind_a_flush_go_as_soon_as_it_is_done() -> None:
    # A window of 0.4 s and a flush of 0.6 s. An event added while the first flush is in flight has waited its window
    # by the time that flush is done: it must go then, not a whole window later.
    store = SlowStore(flush_s=0.6)
    c = Coalescer(store, ProducerMetrics(CollectorRegistry()), window_s=0.4)
    loop = asyncio.get_running_loop()
    first = c.add("ch", NewEvent("token", "a"), Fence("w", 1, take=True))
    await asyncio.sleep(0.5)  # the first flush has started
    assert [d for _, d in store.flushes] == [["a"]]
    second = c.add("ch", NewEvent("token", "b"), Fence("w", 1))
    await first
    first_done = loop.time()
    await second
    started, data = store.flushes[1]
    assert data == ["b"]
    # Gone right after the first flush (well under the 0.4 s a fresh window would have added).
    assert started - first_done < 0.2
    entries = (await store.range("ch", "0", limit=10)).entries
    assert [e.data for e in entries] == ["a", "b"]
    await c.aclose()


async def test_a_batch_gathers_the_events_of_its_window_into_one_flush() -> None:
    store = SlowStore(flush_s=0.0)
    c = Coalescer(store, ProducerMetrics(CollectorRegistry()), window_s=0.2)
    futures = [c.add(f"ch{i % 3}", NewEvent("token", str(i)), Fence(f"w{i % 3}", 1, take=i < 3)) for i in range(9)]
    ids = await asyncio.gather(*futures)
    assert len(store.flushes) == 1
    assert sorted(store.flushes[0][1], key=int) == [str(i) for i in range(9)]
    for k in range(3):
        entries = (await store.range(f"ch{k}", "0", limit=10)).entries
        assert [e.data for e in entries] == [str(i) for i in range(k, 9, 3)]
        assert [e.id for e in entries] == list(ids[k::3])
    await c.aclose()
