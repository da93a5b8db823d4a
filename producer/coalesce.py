"""Coalescer: events from many concurrent generations, gathered for a few milliseconds, appended in one round trip.

Flushes run one at a time, so the events of one channel are stored in the order they were added; while one flush is
in flight the next batch fills up (the slower the store, the bigger the batches). With a window of 0 every event is
its own append: one round trip per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from hub.backend import AppendBatch, Backend, BackendError, NewEvent

from .metrics import ProducerMetrics

__all__ = ["Coalescer"]

log = logging.getLogger(__name__)


class _Pending:
    __slots__ = ("close", "events", "futures")

    def __init__(self) -> None:
        self.events: list[NewEvent] = []
        self.futures: list[asyncio.Future[str]] = []
        self.close = False


class Coalescer:
    def __init__(self, backend: Backend, metrics: ProducerMetrics, *, window_s: float) -> None:
        self._backend = backend
        self._metrics = metrics
        self._window_s = window_s
        self._pending: dict[str, _Pending] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, channel: str, event: NewEvent, *, close: bool = False) -> asyncio.Future[str]:
        """Queue an event; the future resolves to its id once stored, or fails with the store's BackendError.

        After `close` on a channel nothing more may be added to it in the same flush (the store would refuse it).
        """
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        p = self._pending.get(channel)
        if p is None:
            p = self._pending[channel] = _Pending()
        p.events.append(event)
        p.futures.append(fut)
        p.close = p.close or close
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="coalescer")
        return fut

    async def _run(self) -> None:
        while self._pending:
            if self._window_s > 0:
                await asyncio.sleep(self._window_s)
            batch, self._pending = self._pending, {}
            await self._flush(batch)

    async def _flush(self, batch: dict[str, _Pending]) -> None:
        if self._window_s <= 0:
            await self._flush_one_by_one(batch)
            return
        channels = list(batch)
        batches = [AppendBatch(ch, batch[ch].events, batch[ch].close) for ch in channels]
        self._metrics.append_round_trips.inc()
        try:
            results = await self._backend.append_many(batches)
        except BackendError as e:
            results = [e] * len(batches)
        except Exception as e:  # never leave a generation waiting on a future nobody resolves
            log.exception("append failed")
            results = [BackendError(f"append failed: {type(e).__name__}")] * len(batches)
        events = 0
        for ch, result in zip(channels, results, strict=True):
            futures = batch[ch].futures
            if isinstance(result, BackendError):
                for f in futures:
                    if not f.done():
                        f.set_exception(result)
                        f.exception()  # retrieved here, so an unawaited token future does not warn
            else:
                events += len(result)
                for f, event_id in zip(futures, result, strict=True):
                    if not f.done():
                        f.set_result(event_id)
        self._metrics.appended_events.inc(events)

    async def _flush_one_by_one(self, batch: dict[str, _Pending]) -> None:
        # Coalescing off: the baseline of one round trip per event.
        for ch, p in batch.items():
            last = len(p.events) - 1
            for i, (ev, fut) in enumerate(zip(p.events, p.futures, strict=True)):
                self._metrics.append_round_trips.inc()
                try:
                    [event_id] = await self._backend.append(ch, [ev], close=p.close and i == last)
                except BackendError as e:
                    fut.set_exception(e)
                    fut.exception()
                    continue
                self._metrics.appended_events.inc()
                fut.set_result(event_id)

    async def aclose(self) -> None:
        """Store what is pending, then stop."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
