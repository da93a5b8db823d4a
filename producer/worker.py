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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from ssecore.backend import Backend, BackendError, ChannelClosed, ChannelLost, Fence, Fenced, NewEvent, id_before
from ssecore.jobs import TERMINAL_STATUSES, Delivery, GenerationRecord, Job, JobQueue, Status
from ssecore.liveness import Liveness
from ssecore.presence import PRESENCE_SLACK_S, Presence

from .answer import Answer, event, usage_of
from .coalesce import Coalescer
from .metrics import ProducerMetrics
from .providers.base import Finish, GenerationRequest, Provider, ProviderError, TextDelta
from .settings import REDIS_TIMEOUT_S, ProducerSettings
from .slots import Slots

__all__ = ["FINISH_REASONS", "LOOP_AGE_METRIC", "Worker"]

log = logging.getLogger(__name__)

# A generation waits for its own stored tokens this often, so a slow store slows it down instead of piling up memory.
_BACKPRESSURE_EVERY = 64
_FETCH_BLOCK_S = 1.0
_FETCH_BACKOFF_MAX_S = 5.0
# Exported on the worker's /metrics; /healthz answers from the same ages.
LOOP_AGE_METRIC = "producer_loop_progress_age_seconds"
# On shutdown, how long a run already writing its terminal event may still take.
_FINISHING_WAIT_S = 2.0
# Runs of one job beyond --max-attempts (worker deaths, not provider retries) before it is ended with an error.
_EXTRA_RUNS = 2
_INTERNAL = {"code": "internal", "message": "the generation failed inside the worker"}
_CHANNEL_BUSY = {"code": "channel_busy", "message": "another generation is writing to this channel"}
_CHANNEL_LOST = {
    "code": "channel_lost",
    "message": "the generation's channel was released, deleted or expired before it could be written",
}


# What done.finish_reason may say.
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "cancelled", "unwatched"})


def _request(job: Job) -> GenerationRequest:
    return GenerationRequest(
        job.model,
        job.messages,
        job.max_tokens,
        job.temperature,
        job.top_p,
        job.stop,
        job.tools,
        job.tool_choice,
        job.parallel_tool_calls,
        job.response_format,
        job.reasoning_effort,
    )


@dataclass(slots=True)
class _Run:
    delivery: Delivery
    task: asyncio.Task[None] | None = None
    fence: Fence | None = None  # set once the run has its attempt number
    cancel_reason: str | None = None  # "cancelled" or "unwatched": finish the channel with it
    abandon: bool = False  # shutdown, or another worker holds the job now: stop without finishing or acknowledging
    in_provider: bool = False  # inside the provider call: the only place a cancel interrupts
    finishing: bool = False  # the terminal event is being written: too late to cancel
    answer: Answer | None = None  # what the provider call has streamed so far
    started_at: float = field(default_factory=time.time)


class _Outcome:
    __slots__ = ("error", "event", "finish_reason", "message", "status", "usage")

    def __init__(
        self,
        status: Status,
        event: NewEvent,
        *,
        finish_reason: str | None = None,
        usage: dict[str, int | None] | None = None,
        error: dict[str, str] | None = None,
        message: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.event = event
        self.finish_reason = finish_reason
        self.usage = usage
        self.error = error
        self.message = message


class _Abandoned(Exception):
    """This run must stop without a terminal event and without acknowledging its job."""


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
        liveness: Liveness | None = None,
        store_timeout_s: float = REDIS_TIMEOUT_S,
    ) -> None:
        """`liveness`: where the loops report progress. A hub that embeds the worker passes its own, so that one
        `/healthz` covers the hub's loops and the worker's; without it the worker has its own, exported on
        `registry`. `store_timeout_s`: the deadline of one call to the queue or presence (0 for in-process ones)."""
        self.settings = settings
        self.metrics = ProducerMetrics(registry if registry is not None else CollectorRegistry())
        self._backend = backend
        self._queue = queue
        self._providers = providers
        self._presence = presence
        self._coalescer = Coalescer(backend, self.metrics, window_s=settings.coalesce_ms / 1000)
        self._runs: dict[str, _Run] = {}  # by job entry id
        self._unacked: set[str] = set()  # entry ids started here and neither acknowledged nor taken over
        self._slots = Slots(settings.concurrency)
        # Each loop's longest round while the store is down: its wait, then a call that fails at its deadline (the
        # fetch: a blocking read that does, then a back-off). It may take --stall-after longer than that before
        # /healthz fails, so no --stall-after makes a worker fail liveness (and be restarted) for Redis being down.
        t = store_timeout_s
        self._periods = {
            "fetch": _FETCH_BLOCK_S + t + _FETCH_BACKOFF_MAX_S,
            "claim": self._claim_interval_s() + t,
            "renew": settings.renew_s + t,
            "poll": settings.poll_s + t,
        }
        if liveness is None:
            liveness = Liveness()
            liveness.register(self.metrics.registry, LOOP_AGE_METRIC)
        self.liveness = liveness
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    async def run_async(self) -> None:
        """Work until `stop()` (or a signal, under `run()`), then drain within the grace period."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        for name, period_s in self._periods.items():
            self.liveness.watch(name, period_s + self.settings.stall_after_s)
        self._loops = [
            asyncio.create_task(self._supervised(name, body), name=f"worker-{name}")
            for name, body in (
                ("fetch", self._fetch_loop),
                ("claim", self._claim_loop),
                ("renew", self._renew_loop),
                ("poll", self._poll_loop),
            )
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

    @property
    def stopping(self) -> bool:
        """stop() was called: running generations are finishing or being handed back; nothing new is taken."""
        return self._stopping.is_set()

    async def _shutdown(self) -> None:
        # Stop taking jobs, let running ones finish within the grace period, then hand the rest back.
        for t in self._loops[:2]:
            t.cancel()
        for name in ("fetch", "claim"):
            self.liveness.forget(name)
        pending = [r.task for r in self._runs.values() if r.task is not None]
        if pending:
            log.info("waiting up to %.1fs for %d generations", self.settings.grace_s, len(pending))
            await asyncio.wait(pending, timeout=self.settings.grace_s)
        left = list(self._runs.values())
        for r in left:
            r.abandon = True
            if r.task is not None and not r.finishing:
                r.task.cancel()
        # A run writing its terminal event is let finish (bounded): cancelling it would only make the job run again.
        tasks = [r.task for r in left if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=_FINISHING_WAIT_S)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        unfinished = sorted(self._unacked)
        if unfinished:
            try:
                await self._queue.release(self.settings.consumer, unfinished)
                log.info("handed %d unfinished generations back", len(unfinished))
            except BackendError as e:
                log.warning(
                    "could not hand jobs back (%s); they will be claimed after %.0fs", e, self.settings.claim_idle_s
                )
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for name in self._periods:
            self.liveness.forget(name)
        await self._coalescer.aclose()
        if self._session is not None:
            await self._session.close()

    # -- loops --------------------------------------------------------------------------------------------------------

    async def _supervised(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a loop for ever: an unexpected error is logged and the loop restarts, so the worker never half-dies."""
        while True:
            try:
                await body()
            except Exception:
                log.exception("worker loop %s failed; restarting it", name)
                await asyncio.sleep(1.0)

    def _claim_interval_s(self) -> float:
        return min(5.0, self.settings.claim_idle_s / 3)

    async def _take(self, get: Callable[[int], Awaitable[list[Delivery]]], *, reserve: bool) -> int:
        """Ask for as many jobs as there are free slots and start them.

        A claim reserves its slots while it waits, so a fetch cannot overbook them. A fetch (which blocks for up to a
        second) does not: it would starve the take-over of dead workers' jobs. So a claim finishing during a fetch
        may put the worker over --concurrency by what it claimed, for that moment.
        """
        free = self._slots.free
        if free <= 0:
            return 0
        with self._slots.reserve(free if reserve else 0):
            deliveries = await get(free)
        for d in deliveries:
            if d.entry_id in self._runs:
                continue  # our own running job, idle because its renewal was late: it is ours again
            if d.restarted:
                log.info("taking over generation %s (its worker stopped renewing)", d.job.id)
            self._start(d)
        return len(deliveries)

    async def _fetch_loop(self) -> None:
        backoff = 0.1
        while True:
            self.liveness.beat("fetch")
            # Bounded, so that a full worker still goes round (and shows it does); Slots wakes it as soon as a run
            # ends or a claim gives back the slots it had reserved.
            if not await self._slots.wait_for_room(_FETCH_BLOCK_S):
                continue
            try:
                await self._take(lambda n: self._queue.fetch(self.settings.consumer, n, _FETCH_BLOCK_S), reserve=False)
            except BackendError as e:
                log.warning("fetching jobs failed (%s); retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _FETCH_BACKOFF_MAX_S)
                continue
            backoff = 0.1

    async def _claim_loop(self) -> None:
        interval = self._claim_interval_s()
        s = self.settings
        while True:
            self.liveness.beat("claim")
            await asyncio.sleep(interval)
            try:
                await self._take(lambda n: self._queue.claim_stale(s.consumer, s.claim_idle_s, n), reserve=True)
            except BackendError as e:
                log.warning("claiming stale jobs failed: %s", e)

    async def _renew_loop(self) -> None:
        while True:
            self.liveness.beat("renew")
            await asyncio.sleep(self.settings.renew_s)
            try:
                lost = await self._queue.renew(self.settings.consumer, list(self._runs))
            except BackendError as e:
                log.warning("renewing job claims failed: %s", e)
                continue
            for entry_id in lost:
                run = self._runs.get(entry_id)
                if run is not None and run.task is not None:
                    # Another worker took the job over (this one was too slow to renew): its run is the job now.
                    log.warning(
                        "generation %s was taken over by another worker; stopping this run", run.delivery.job.id
                    )
                    run.abandon = True
                    self._unacked.discard(entry_id)
                    run.task.cancel()

    async def _poll_loop(self) -> None:
        while True:
            self.liveness.beat("poll")
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self._check_cancels()
            except BackendError as e:
                log.warning("checking cancel requests failed: %s", e)

    async def _check_cancels(self) -> None:
        runs = [r for r in self._runs.values() if not r.finishing and r.cancel_reason is None and not r.abandon]
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
        log.info("cancelling generation %s (%s)", run.delivery.job.id, reason)
        run.cancel_reason = reason
        # Only the provider call is interrupted; elsewhere the run checks cancel_reason itself before calling.
        if run.in_provider and run.task is not None:
            run.task.cancel()

    def _start(self, d: Delivery) -> None:
        run = _Run(d)
        self._runs[d.entry_id] = run
        self._slots.hold(d.entry_id)
        self._unacked.add(d.entry_id)
        self.metrics.running.set(len(self._runs))
        run.task = asyncio.create_task(self._generate(run), name=f"generation-{d.job.id}")
        run.task.add_done_callback(lambda _t: self._finished(d.entry_id))

    def _finished(self, entry_id: str) -> None:
        self._runs.pop(entry_id, None)
        self.metrics.running.set(len(self._runs))
        self._slots.vacate(entry_id)

    async def _ack(self, run: _Run) -> None:
        await self._queue.ack(run.delivery.entry_id)
        self._unacked.discard(run.delivery.entry_id)

    # -- one generation -----------------------------------------------------------------------------------------------

    async def _generate(self, run: _Run) -> None:
        job = run.delivery.job
        try:
            await self._run_job(run)
        except _Abandoned:
            pass
        except asyncio.CancelledError:
            if not run.abandon:
                raise
        except BackendError as e:
            # Not acknowledged: after --claim-idle another worker (or this one) re-runs it from a reset.
            log.warning("generation %s: the store failed (%s); it will be re-run", job.id, e)
        except Exception:
            # A bug must not leave the channel open for ever, nor make the job run again and again.
            log.exception("generation %s failed unexpectedly", job.id)
            with contextlib.suppress(Exception):
                await self._finish(run, _Outcome("error", event("error", _INTERNAL), error=dict(_INTERNAL)))
        finally:
            if run.fence is not None:
                self._coalescer.forget(job.channel, run.fence)

    async def _run_job(self, run: _Run) -> None:
        job = run.delivery.job
        attempt = await self._queue.begin_attempt(job.id)
        # The take checks that the channel is still the owner's (see Fence.channel_owner): a reservation undone after
        # a submit that seemed to fail, but landed, must not leave this run writing a channel anyone may read.
        run.fence = Fence(job.id, attempt, take=True, channel_owner=job.owner)
        record = await self._queue.get(job.id)
        if record is not None and record.status in TERMINAL_STATUSES:
            await self._ack(run)  # finished before; only the acknowledgement was lost
            return
        if record is None:
            record = GenerationRecord.queued(job)
        if attempt == 1:
            self.metrics.queue_lag_seconds.observe(max(0.0, time.time() - job.created_at))
        record.status, record.started_at = "running", time.time()
        await self._queue.update(record)
        try:
            # Claim the channel for this run and open it, before any provider call (which costs money).
            if run.delivery.restarted:
                self.metrics.restarts.inc()
                _ = self._add(run, event("reset", {"reason": "restarted"}))
            await self._add(run, event("start", {"id": job.id, "provider": job.provider, "model": job.model}))
            if attempt > self.settings.max_attempts + _EXTRA_RUNS:
                error = {"code": "too_many_restarts", "message": "the generation was restarted too many times"}
                outcome = _Outcome("error", event("error", error), error=error)
            else:
                outcome = await self._produce(run)
        except ChannelClosed:
            await self._finished_before(run, record)
            return
        except Fenced:
            await self._fenced(run, attempt, _CHANNEL_BUSY)
            return
        except ChannelLost:
            await self._fenced(run, attempt, _CHANNEL_LOST)
            return
        await self._finish(run, outcome, record)

    def _add(self, run: _Run, event: NewEvent, *, close: bool = False) -> asyncio.Future[str]:
        assert run.fence is not None
        fut = self._coalescer.add(run.delivery.job.channel, event, run.fence, close=close)
        if run.fence.take:
            run.fence = Fence(run.fence.owner, run.fence.attempt)  # taken with this event; checked from now on
        return fut

    async def _finish(self, run: _Run, outcome: _Outcome, record: GenerationRecord | None = None) -> None:
        """Store the terminal event (closing the channel), then the record, then acknowledge the job."""
        job = run.delivery.job
        run.finishing = True
        await self._add(run, outcome.event, close=True)
        record = record or await self._queue.get(job.id)
        if record is not None:
            record.status, record.finished_at = outcome.status, time.time()
            record.finish_reason, record.usage, record.error = outcome.finish_reason, outcome.usage, outcome.error
            record.message = outcome.message
            await self._queue.update(record)
        self.metrics.finished.labels(job.provider, outcome.status).inc()
        await self._ack(run)

    async def _finished_before(self, run: _Run, record: GenerationRecord) -> None:
        """The channel is already closed: an earlier run stored the terminal event and died before acknowledging.
        Take the outcome from that event, so the record tells what the channel tells."""
        job = run.delivery.job
        info = await self._backend.info(job.channel)
        last = (await self._backend.range(job.channel, id_before(info.last_id), limit=1)).entries if info else []
        if last and last[0].close and last[0].event in ("done", "error"):
            data = orjson.loads(last[0].data)
            if last[0].event == "error":
                record.status, record.error, record.finish_reason = "error", data, "error"
            else:
                reason = data.get("finish_reason")
                record.status = "cancelled" if reason in ("cancelled", "unwatched") else "done"
                record.finish_reason, record.usage, record.message = reason, data.get("usage"), data.get("message")
        else:
            # The channel was closed by someone else (a publisher sharing it): this generation could not run.
            error = {"code": "channel_closed", "message": "the channel was already closed"}
            record.status, record.error, record.finish_reason = "error", error, "error"
        record.finished_at = time.time()
        await self._queue.update(record)
        log.info("generation %s had already finished (%s)", job.id, record.status)
        await self._ack(run)

    async def _fenced(self, run: _Run, attempt: int, reason: Mapping[str, str]) -> None:
        """The run may not write the channel, and wrote nothing: a later run of this job holds it (then stop quietly),
        or this job cannot write it at all (another generation holds it, or it is no longer the owner's): then the
        job ends with `reason`, its channel untouched."""
        job = run.delivery.job
        current = await self._queue.get(job.id)
        if current is not None and current.attempts > attempt:
            raise _Abandoned
        if current is not None:
            error = dict(reason)
            log.warning("generation %s cannot write its channel: %s", job.id, error["code"])
            current.status, current.error, current.finish_reason = "error", error, "error"
            current.finished_at = time.time()
            await self._queue.update(current)
        await self._ack(run)

    async def _produce(self, run: _Run) -> _Outcome:
        """Call the provider and stream its answer; return the terminal event (not yet stored)."""
        job = run.delivery.job
        finish: Finish | None = None
        try:
            if run.cancel_reason is None:
                provider = self._providers.get(job.provider)
                if provider is None:
                    raise ProviderError("unknown_provider", f"this worker has no provider {job.provider!r}")
                run.in_provider = True
                try:
                    finish = await self._call_provider(run, provider)
                finally:
                    run.in_provider = False
                return self._done(run, finish.finish_reason, finish)
        except ProviderError as e:
            error = {"code": e.code, "message": e.message}
            return _Outcome("error", event("error", error), error=error, finish_reason="error")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if run.abandon or run.cancel_reason is None or task is None:
                raise
            task.uncancel()
        reason = run.cancel_reason
        assert reason is not None
        return self._done(run, reason, finish, status="cancelled")

    @staticmethod
    def _done(run: _Run, reason: str, finish: Finish | None, *, status: Status = "done") -> _Outcome:
        """`done` with the whole message (what was streamed, for a cancelled answer)."""
        usage = usage_of(finish)
        message = (run.answer or Answer("")).message(finish)
        done: dict[str, Any] = {"finish_reason": reason, "usage": usage, "message": message}
        if reason not in FINISH_REASONS:
            # One vocabulary for every provider: a reason of a provider's own (Gemini's MALFORMED_FUNCTION_CALL,
            # Anthropic's pause_turn) ends a stop, and is told beside it.
            done["finish_reason"], done["provider_finish_reason"] = "stop", reason
            reason = "stop"
        return _Outcome(status, event("done", done), finish_reason=reason, usage=usage, message=message)

    async def _call_provider(self, run: _Run, provider: Provider) -> Finish:
        job = run.delivery.job
        assert self._session is not None and run.fence is not None
        request = _request(job)
        s = self.settings
        tokens = 0  # of the answer's text
        written = 0  # events of any kind: once one is out, a new attempt would repeat it
        for attempt in range(1, s.max_attempts + 1):
            started = time.monotonic()
            first_at: float | None = None
            finish: Finish | None = None
            pending: asyncio.Future[str] | None = None
            answer = run.answer = Answer(provider.kind)
            try:
                async with contextlib.aclosing(provider.stream(self._session, request)) as items:
                    async for item in items:
                        if isinstance(item, Finish):
                            finish = item
                        elif first_at is None:
                            first_at = time.monotonic()
                            self.metrics.first_token_seconds.labels(provider.name).observe(first_at - started)
                        tokens += isinstance(item, TextDelta)
                        for ev in answer.events(item):
                            pending = self._add(run, ev)
                            written += 1
                            if written % _BACKPRESSURE_EVERY == 0:
                                await pending  # surfaces a store failure, and paces us to the store
                if pending is not None:
                    await pending
            except ProviderError as e:
                self.metrics.provider_errors.labels(provider.name, str(e.status or "none"), e.code).inc()
                # Once the provider accepted the request it may be generating (and billing): never ask twice.
                if not e.retryable or e.accepted or written > 0 or attempt == s.max_attempts:
                    raise
                delay = e.after_s if e.after_s is not None else s.backoff_s * 2 ** (attempt - 1)
                if delay > s.backoff_max_s:
                    raise  # the provider asks for a longer wait than we may retry within: give up now, honestly
                log.info("generation %s: %s; retry %d in %.1fs", job.id, e.code, attempt, delay)
                await asyncio.sleep(max(0.0, delay))
                continue
            finally:
                if (error := self._coalescer.failure(job.channel, run.fence)) is not None:
                    raise error  # a token was not stored: never finish over a gap
            self._observe_pace(provider.name, tokens, first_at)
            return finish or Finish("stop")
        raise AssertionError("unreachable")  # the loop either returns or raises

    def _observe_pace(self, provider: str, tokens: int, first_at: float | None) -> None:
        self.metrics.tokens.labels(provider).inc(tokens)
        if first_at is not None and tokens > 1:
            elapsed = time.monotonic() - first_at
            if elapsed > 0:
                self.metrics.tokens_per_second.labels(provider).observe((tokens - 1) / elapsed)
