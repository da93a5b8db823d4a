"""Coalescer: events from many concurrent generations, gathered for a few milliseconds, appended in one round trip.

A batch is flushed once its first event has waited the window, so no event waits longer than that for its flush to
start, except behind a flush in flight. Flushes run one at a time, so the events of one writer are stored in the order
they were added; while one flush is in flight the next batch fills up (the slower the store, the bigger the batches),
and it goes as soon as that flush is done if its window has passed meanwhile. With a window of 0 every event is its
own append: one round trip per token.

A writer is one run of one generation on one channel (its Fence). Once a flush fails for a writer, every later event
of that writer fails at once: a later batch must never be stored after a lost one, which would be a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ssecore.backend import AppendBatch, Backend, BackendError, ChannelClosed, Fence, NewEvent

from .metrics import ProducerMetrics

__all__ = ["DEFAULT_WINDOW_MS", "Coalescer"]

# Long enough to gather the tokens that arrive together (one network read of a provider's stream, many generations at
# once: at 20,000 tokens/s, 40 appends per round trip), short enough to add little to each token's way to the browser.
# At full speed a worker spends 7.5 us per token with it, 6.8 us with 5 ms (`bench/producer.py`).
DEFAULT_WINDOW_MS = 2.0

log = logging.getLogger(__name__)

_Writer = tuple[str, str, int]  # channel, fence owner, fence attempt


class _Pending:
    __slots__ = ("channel_owner", "close", "events", "futures", "take")

    def __init__(self) -> None:
        self.events: list[NewEvent] = []
        self.futures: list[asyncio.Future[str]] = []
        self.close = False
        self.take = False
        self.channel_owner: str | None = None  # the take's (see Fence.channel_owner)

    def fence(self, owner: str, attempt: int, after: str | None, *, first: bool = True) -> Fence:
        """The fence of an append of these events: the take, with its owner check, only with the first of them; else
        the check that the writer's last stored event (`after`) is still the channel's newest."""
        take = self.take and first
        return Fence(owner, attempt, take, self.channel_owner if take else None, None if take else after)


def _fail(fut: asyncio.Future[str], error: BackendError) -> None:
    if not fut.done():
        fut.set_exception(error)
        fut.exception()  # marked retrieved: a token future nobody awaits must not warn


class Coalescer:
    def __init__(self, backend: Backend, metrics: ProducerMetrics, *, window_s: float) -> None:
        self._backend = backend
        self._metrics = metrics
        self._window_s = window_s
        self._pending: dict[_Writer, _Pending] = {}
        self._since = 0.0  # loop time of the pending batch's first event
        self._failed: dict[_Writer, BackendError] = {}
        # Per writer, the id of its last stored event: its next append is refused if the store lost it (Fence.after).
        self._last: dict[_Writer, str] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, channel: str, event: NewEvent, fence: Fence, *, close: bool = False) -> asyncio.Future[str]:
        """Queue an event of one writer; the future resolves to its id once stored, or fails with a BackendError.

        `fence.take` on a writer's first event claims the channel for it. After `close`, or after a failure, the
        writer's further events fail at once.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        writer = (channel, fence.owner, fence.attempt)
        if (error := self._failed.get(writer)) is not None:
            _fail(fut, error)
            return fut
        p = self._pending.get(writer)
        if p is None:
            if not self._pending:
                self._since = loop.time()
            p = self._pending[writer] = _Pending()
        elif p.close:
            _fail(fut, ChannelClosed(channel))
            return fut
        p.events.append(event)
        p.futures.append(fut)
        p.close = close
        if fence.take:
            p.take, p.channel_owner = True, fence.channel_owner
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="coalescer")
        return fut

    def failure(self, channel: str, fence: Fence) -> BackendError | None:
        """The error that stopped this writer, if any."""
        return self._failed.get((channel, fence.owner, fence.attempt))

    def forget(self, channel: str, fence: Fence) -> None:
        """The writer is done: drop what is remembered about it."""
        self._failed.pop((channel, fence.owner, fence.attempt), None)
        self._last.pop((channel, fence.owner, fence.attempt), None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            # The window counts from the batch's first event, not from the end of the last flush: events that came
            # while a flush was in flight have waited already.
            if self._window_s > 0 and (wait_s := self._since + self._window_s - loop.time()) > 0:
                await asyncio.sleep(wait_s)
            batch, self._pending = self._pending, {}
            try:
                if self._window_s > 0:
                    await self._flush(batch)
                else:
                    await self._flush_one_by_one(batch)
            except Exception as e:  # never leave a generation waiting on a future nobody resolves
                log.exception("append failed")
                self._settle(batch, BackendError(f"append failed: {type(e).__name__}"))

    def _settle(self, batch: dict[_Writer, _Pending], error: BackendError) -> None:
        for writer, p in batch.items():
            self._failed[writer] = error
            for f in p.futures:
                _fail(f, error)

    async def _flush(self, batch: dict[_Writer, _Pending]) -> None:
        writers = list(batch)
        batches = [
            AppendBatch(ch, p.events, p.close, p.fence(o, a, self._last.get((ch, o, a))))
            for ch, o, a in writers
            for p in (batch[(ch, o, a)],)
        ]
        self._metrics.append_round_trips.inc()
        try:
            results = await self._backend.append_many(batches)
        except BackendError as e:
            results = [e] * len(batches)
        events = 0
        for writer, result in zip(writers, results, strict=True):
            futures = batch[writer].futures
            if isinstance(result, BackendError):
                self._failed[writer] = result
                for f in futures:
                    _fail(f, result)
            else:
                events += len(result)
                self._last[writer] = result[-1]
                for f, event_id in zip(futures, result, strict=True):
                    if not f.done():
                        f.set_result(event_id)
        self._metrics.appended_events.inc(events)

    async def _flush_one_by_one(self, batch: dict[_Writer, _Pending]) -> None:
        # Coalescing off: the baseline of one round trip per event.
        for (ch, owner, attempt), p in batch.items():
            last = len(p.events) - 1
            for i, (ev, fut) in enumerate(zip(p.events, p.futures, strict=True)):
                writer = (ch, owner, attempt)
                fence = p.fence(owner, attempt, self._last.get(writer), first=i == 0)
                error = self._failed.get(writer)
                if error is None:
                    self._metrics.append_round_trips.inc()
                    [result] = await self._backend.append_many([AppendBatch(ch, [ev], p.close and i == last, fence)])
                    if isinstance(result, list):
                        self._last[writer] = result[0]
                        self._metrics.appended_events.inc()
                        if not fut.done():
                            fut.set_result(result[0])
                        continue
                    error = self._failed[writer] = result
                _fail(fut, error)

    async def aclose(self) -> None:
        """Store what is pending, then stop."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
