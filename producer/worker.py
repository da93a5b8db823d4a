"""Worker: takes generation jobs, streams each provider's tokens into the job's channel, and finishes it exactly once.

Every channel a generation writes gets `start`, then `token`s, then one terminal event stored with the close flag
(`done`, `error`, or `done` with finish_reason "cancelled"/"unwatched"). A job is acknowledged only after that event is
stored. A job whose worker died is taken over by another (`claim_stale`); the re-run first writes `reset` with
reason "restarted" so clients drop the partial text. Lifecycle after arq: `run_async()` works until `stop()` (called
by the signal handler of `python -m producer`, or by the hub that embeds the worker on the memory backend), then
drains within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from hub.backend import Backend, BackendError, ChannelClosed, NewEvent
from hub.presence import PRESENCE_SLACK_S, Presence

from .coalesce import Coalescer
from .jobs import Delivery, GenerationRecord, JobQueue, Status
from .metrics import ProducerMetrics
from .providers.base import Finish, GenerationRequest, Provider, ProviderError, TextDelta
from .settings import ProducerSettings

__all__ = ["Worker"]

log = logging.getLogger(__name__)

# A generation waits for its own stored tokens this often, so a slow store slows it down instead of piling up memory.
_BACKPRESSURE_EVERY = 64
_FETCH_BLOCK_S = 1.0


def _event(name: str, data: Mapping[str, Any]) -> NewEvent:
    return NewEvent(name, orjson.dumps(data).decode())


@dataclass(slots=True)
class _Run:
    delivery: Delivery
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None  # set by the worker itself: "cancelled" or "unwatched"
    finishing: bool = False  # the terminal event is being written: too late to cancel
    started_at: float = field(default_factory=time.time)


class _Outcome:
    __slots__ = ("error", "event", "finish_reason", "status", "usage")

    def __init__(
        self,
        status: Status,
        event: NewEvent,
        *,
        finish_reason: str | None = None,
        usage: dict[str, int | None] | None = None,
        error: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.event = event
        self.finish_reason = finish_reason
        self.usage = usage
        self.error = error


class Worker:
    def __init__(
        self,
        settings: ProducerSettings,
        *,
        backend: Backend,
        queue: JobQueue,
        providers: Mapping[str, Provider],
        presence: Presence | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = ProducerMetrics(registry if registry is not None else CollectorRegistry())
        self._backend = backend
        self._queue = queue
        self._providers = providers
        self._presence = presence
        self._coalescer = Coalescer(backend, self.metrics, window_s=settings.coalesce_ms / 1000)
        self._runs: dict[str, _Run] = {}  # by job entry id
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    async def run_async(self) -> None:
        """Work until `stop()` (or a signal, under `run()`), then drain within the grace period."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self._loops = [
            asyncio.create_task(self._fetch_loop(), name="worker-fetch"),
            asyncio.create_task(self._claim_loop(), name="worker-claim"),
            asyncio.create_task(self._renew_loop(), name="worker-renew"),
            asyncio.create_task(self._poll_loop(), name="worker-poll"),
        ]
        log.info(
            "worker %s started: concurrency %d, providers %s",
            self.settings.consumer,
            self.settings.concurrency,
            ", ".join(sorted(self._providers)),
        )
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def _shutdown(self) -> None:
        # Stop taking jobs, let running ones finish within the grace period, then hand the rest back.
        for t in self._loops[:2]:
            t.cancel()
        pending = [r.task for r in self._runs.values() if r.task is not None]
        if pending:
            log.info("waiting up to %.1fs for %d generations", self.settings.grace_s, len(pending))
            await asyncio.wait(pending, timeout=self.settings.grace_s)
        left = list(self._runs.values())
        for r in left:
            if r.task is not None:
                r.task.cancel()
        for r in left:
            if r.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await r.task
        if left:
            try:
                await self._queue.release(self.settings.consumer, [r.delivery.entry_id for r in left])
                log.info("handed %d unfinished generations back", len(left))
            except BackendError as e:
                log.warning(
                    "could not hand jobs back (%s); they will be claimed after %.0fs", e, self.settings.claim_idle_s
                )
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self._coalescer.aclose()
        if self._session is not None:
            await self._session.close()

    # -- loops --------------------------------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        return self.settings.concurrency - len(self._runs)

    async def _fetch_loop(self) -> None:
        backoff = 0.1
        while True:
            free = self._free_slots()
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                deliveries = await self._queue.fetch(self.settings.consumer, free, _FETCH_BLOCK_S)
            except BackendError as e:
                log.warning("fetching jobs failed (%s); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            for d in deliveries:
                self._start(d)

    async def _claim_loop(self) -> None:
        interval = min(5.0, self.settings.claim_idle_s / 3)
        while True:
            await asyncio.sleep(interval)
            free = self._free_slots()
            if free <= 0:
                continue
            try:
                deliveries = await self._queue.claim_stale(self.settings.consumer, self.settings.claim_idle_s, free)
            except BackendError as e:
                log.warning("claiming stale jobs failed: %s", e)
                continue
            for d in deliveries:
                if d.entry_id not in self._runs:
                    log.info("taking over generation %s (its worker stopped renewing)", d.job.id)
                    self._start(d)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.renew_s)
            try:
                await self._queue.renew(self.settings.consumer, list(self._runs))
            except BackendError as e:
                log.warning("renewing job claims failed: %s", e)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self._check_cancels()
            except BackendError as e:
                log.warning("checking cancel requests failed: %s", e)

    async def _check_cancels(self) -> None:
        runs = [r for r in self._runs.values() if not r.finishing and r.cancel_reason is None]
        if not runs:
            return
        requested = await self._queue.cancel_requested([r.delivery.job.id for r in runs])
        watched = [r for r in runs if r.delivery.job.cancel_if_unwatched_s and r.delivery.job.id not in requested]
        seen = await self._presence.last_seen([r.delivery.job.channel for r in watched]) if self._presence else {}
        now = time.time()
        for r in runs:
            job = r.delivery.job
            if job.id in requested:
                self._cancel(r, "cancelled")
            elif r in watched and job.cancel_if_unwatched_s is not None:
                last = max(seen.get(job.channel, 0.0), r.started_at)
                if now - last > job.cancel_if_unwatched_s + PRESENCE_SLACK_S:
                    self._cancel(r, "unwatched")

    def _cancel(self, run: _Run, reason: str) -> None:
        if run.task is not None and not run.finishing and run.cancel_reason is None:
            log.info("cancelling generation %s (%s)", run.delivery.job.id, reason)
            run.cancel_reason = reason
            run.task.cancel()

    def _start(self, d: Delivery) -> None:
        run = _Run(d)
        self._runs[d.entry_id] = run
        self.metrics.running.set(len(self._runs))
        run.task = asyncio.create_task(self._generate(run), name=f"generation-{d.job.id}")
        run.task.add_done_callback(lambda _t: self._finished(d.entry_id))

    def _finished(self, entry_id: str) -> None:
        self._runs.pop(entry_id, None)
        self.metrics.running.set(len(self._runs))
        self._slot_free.set()

    # -- one generation -----------------------------------------------------------------------------------------------

    async def _generate(self, run: _Run) -> None:
        job = run.delivery.job
        record = await self._queue.get(job.id) or GenerationRecord(
            job.id, job.provider, job.model, job.channel, created_at=job.created_at
        )
        if record.status in ("done", "error", "cancelled"):
            # Finished before: only the acknowledgement was lost.
            await self._queue.ack(run.delivery.entry_id)
            return
        first_attempt = record.attempts == 0
        record.status, record.started_at, record.attempts = "running", time.time(), record.attempts + 1
        await self._queue.update(record)
        if first_attempt:
            self.metrics.queue_lag_seconds.observe(max(0.0, time.time() - job.created_at))
        try:
            outcome = await self._produce(run)
            run.finishing = True
            await self._coalescer.add(job.channel, outcome.event, close=True)
        except ChannelClosed:
            # A previous run stored the terminal event and died before acknowledging; the channel is complete.
            log.info("generation %s was already finished", job.id)
            outcome = _Outcome("done", _event("done", {}), finish_reason=record.finish_reason)
        except BackendError as e:
            # Not acknowledged: after --claim-idle another worker (or this one) re-runs it from a reset.
            log.warning("generation %s: storing events failed (%s); it will be taken over", job.id, e)
            return
        record.status, record.finished_at = outcome.status, time.time()
        record.finish_reason, record.usage, record.error = outcome.finish_reason, outcome.usage, outcome.error
        self.metrics.finished.labels(job.provider, outcome.status).inc()
        try:
            await self._queue.update(record)
            await self._queue.ack(run.delivery.entry_id)
        except BackendError as e:
            log.warning("generation %s finished but could not be acknowledged: %s", job.id, e)

    async def _produce(self, run: _Run) -> _Outcome:
        """Stream the generation's events; return its terminal event (not yet stored)."""
        job = run.delivery.job
        add = self._coalescer.add
        if run.delivery.restarted:
            self.metrics.restarts.inc()
            _ = add(job.channel, _event("reset", {"reason": "restarted"}))
        _ = add(job.channel, _event("start", {"id": job.id, "provider": job.provider, "model": job.model}))
        tokens = 0
        usage: dict[str, int | None] = {"input_tokens": None, "output_tokens": None}
        try:
            provider = self._providers.get(job.provider)
            if provider is None:
                raise ProviderError("unknown_provider", f"this worker has no provider {job.provider!r}")
            finish, tokens = await self._call_provider(run, provider)
            usage = {"input_tokens": finish.input_tokens, "output_tokens": finish.output_tokens}
            done = {"finish_reason": finish.finish_reason, "usage": usage}
            return _Outcome("done", _event("done", done), finish_reason=finish.finish_reason, usage=usage)
        except ProviderError as e:
            error = {"code": e.code, "message": e.message}
            return _Outcome("error", _event("error", error), error=error, finish_reason="error")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if run.cancel_reason is None or task is None or self._stopping.is_set():
                raise  # shutdown: not ours to finish; the job is handed back
            task.uncancel()
            reason = run.cancel_reason
            done = {"finish_reason": reason, "usage": usage}
            return _Outcome("cancelled", _event("done", done), finish_reason=reason, usage=usage)

    async def _call_provider(self, run: _Run, provider: Provider) -> tuple[Finish, int]:
        job = run.delivery.job
        assert self._session is not None
        request = GenerationRequest(job.model, job.messages, job.max_tokens, job.temperature, job.top_p, job.stop)
        s = self.settings
        tokens = 0
        for attempt in range(1, s.max_attempts + 1):
            started = time.monotonic()
            first_at: float | None = None
            finish: Finish | None = None
            pending: asyncio.Future[str] | None = None
            try:
                async with contextlib.aclosing(provider.stream(self._session, request)) as items:
                    async for item in items:
                        if isinstance(item, TextDelta):
                            if first_at is None:
                                first_at = time.monotonic()
                                self.metrics.first_token_seconds.labels(provider.name).observe(first_at - started)
                            tokens += 1
                            pending = self._coalescer.add(job.channel, _event("token", {"text": item.text}))
                            if tokens % _BACKPRESSURE_EVERY == 0:
                                await pending  # surfaces a store failure, and paces us to the store
                        else:
                            finish = item
                if pending is not None:
                    await pending
            except ProviderError as e:
                self.metrics.provider_errors.labels(provider.name, str(e.status or "none"), e.code).inc()
                if not e.retryable or tokens > 0 or attempt == s.max_attempts:
                    raise
                delay = e.after_s if e.after_s is not None else s.backoff_s * 2 ** (attempt - 1)
                delay = min(s.backoff_max_s, max(0.0, delay))
                log.info("generation %s: %s; retry %d in %.1fs", job.id, e.code, attempt, delay)
                await asyncio.sleep(delay)
                continue
            self.metrics.tokens.labels(provider.name).inc(tokens)
            if first_at is not None and tokens > 1:
                elapsed = time.monotonic() - first_at
                if elapsed > 0:
                    self.metrics.tokens_per_second.labels(provider.name).observe((tokens - 1) / elapsed)
            return finish or Finish("stop"), tokens
        raise AssertionError("unreachable")  # the loop either returns or raises
