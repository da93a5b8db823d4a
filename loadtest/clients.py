"""The clients, as worker roles: subscribers on raw asyncio streams, the paced fan-out publisher, and the publish
throughput loops. Each role runs inside a worker process (`loadtest.worker`) and counts into `ctx.tick`.

`ROLES` maps a role name to its coroutine; a scenario (`loadtest.scenario`) spawns workers by role name with a job
(a frozen dataclass that pickles) and drives them with commands.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aiohttp

from ssecore.sse import SSEEvent, SSEParser

from .accounting import Histogram, SequenceTracker, StreamTotals
from .adapters import ADAPTERS, Adapter, PublishError, decode_data, encode_data
from .http1 import BodyDecoder, Endpoint, HttpError, body_decoder, build_get, parse_head
from .worker import WorkerContext

__all__ = [
    "ROLES",
    "FanoutPublishJob",
    "GenerationsJob",
    "PublishLoopsJob",
    "SubscribeJob",
    "SubscriberPool",
]

_READ_BYTES = 1 << 16
# Publish requests scheduled but not yet answered; past this the publisher waits instead of piling up tasks, and the
# schedule lag it reports shows the server could not keep up.
_MAX_PENDING = 10_000
_PUBLISH_TIMEOUT_S = 30.0
_CLOSE_WAIT_S = 5.0
# Pacing granularity of the generations writer: lag within one tick is not lag.
_TICK_S = 0.005


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _reason(e: BaseException) -> str:
    """A short, countable name for a failure."""
    if isinstance(e, OSError) and e.errno is not None:
        return errno.errorcode.get(e.errno, type(e).__name__)
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "closed"
    return type(e).__name__


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError, TimeoutError):
        async with asyncio.timeout(_CLOSE_WAIT_S):
            await writer.wait_closed()


def _session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(connections, 1)),
        timeout=aiohttp.ClientTimeout(total=_PUBLISH_TIMEOUT_S),
    )


# -- subscribers ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscribeJob:
    target: str  # adapter name
    streams: tuple[tuple[str, str], ...]  # (stream URL, channel) of each subscriber, in opening order
    ramp_per_s: float  # this worker's share of the ramp
    token: str | None
    connect_timeout_s: float
    source_addresses: tuple[str, ...] = ()  # of each stream in `streams`, in order; () for the system's choice


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Stream:
    """One subscriber: its connection task and its delivery record."""

    __slots__ = (
        "channel",
        "endpoint",
        "expected",
        "last_id",
        "ready",
        "resumed_at",
        "settled",
        "source",
        "task",
        "tracker",
    )

    def __init__(self, url: str, channel: str, loop: asyncio.AbstractEventLoop, source: str | None = None) -> None:
        self.endpoint = Endpoint.from_url(url)
        self.channel = channel
        self.source = (source, 0) if source else None  # the local address it connects from
        self.tracker = SequenceTracker()
        self.expected: int | None = None  # known once the publisher is done
        self.settled = False  # complete, or given up on (dropped); counted once towards the drain
        self.ready: asyncio.Future[bool] = loop.create_future()  # True: stream live; False: the attempt failed
        self.task: asyncio.Task[None] | None = None
        self.last_id = ""  # the SSE id of the last event received: what a reconnect sends as Last-Event-ID
        self.resumed_at: float | None = None  # wall time a storm's reconnect got its answer, until caught up


class SubscriberPool:
    """This worker's share of the subscribers: opened at the ramp, read until drained, then closed."""

    def __init__(self, ctx: WorkerContext, job: SubscribeJob) -> None:
        loop = asyncio.get_running_loop()
        self.ctx = ctx
        self.adapter: Adapter = ADAPTERS[job.target]()
        self.ramp_per_s = job.ramp_per_s
        self.connect_timeout_s = job.connect_timeout_s
        self.headers = _auth(job.token)
        sources = job.source_addresses or (None,) * len(job.streams)
        pairs = zip(job.streams, sources, strict=True)
        self.streams = [_Stream(url, channel, loop, src) for (url, channel), src in pairs]
        self.totals = StreamTotals()  # resets, unexpected and dropped, counted as they happen
        self._ssl: ssl.SSLContext | None = None
        self._unsettled = 0
        self._all_settled = asyncio.Event()
        self._storm_t0 = 0.0
        self._catching = 0  # streams reconnected by the storm and not yet caught up
        self._all_caught_up = asyncio.Event()
        self._answering = 0  # storm reconnects not yet answered (or failed)
        # Storm start → the first event published after the reconnect was answered (which, with the sequence checks,
        # proves the stream has everything before it): includes waiting for that next event on the channel.
        self.catch_up_us = Histogram()
        self.reconnect_us = Histogram()  # storm start → the reconnect's response, per stream
        self.reconnect_failed = 0

    async def open_all(self) -> None:
        """Start every connection at the ramp's pace; return when each is live or has failed."""
        if not self.streams:
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for k, s in enumerate(self.streams):
            delay = t0 + k / self.ramp_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            s.task = asyncio.create_task(self._run(s))
        await asyncio.wait([s.ready for s in self.streams])

    async def drain(self, expected: Mapping[str, int], timeout_s: float) -> None:
        """Wait until every live stream received all `expected[channel]` events, or `timeout_s` passed."""
        for s in self.streams:
            if not (s.ready.done() and s.ready.result()):
                continue
            s.expected = expected.get(s.channel, 0)
            if s.tracker.complete(s.expected) or s.task is None or s.task.done():
                s.settled = True
            else:
                self._unsettled += 1
        if self._unsettled:
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._all_settled.wait()

    async def close(self) -> None:
        """End every connection (cancelling a task closes its socket in the task's own cleanup)."""
        tasks = [s.task for s in self.streams if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def result(self, expected: Mapping[str, int]) -> StreamTotals:
        out = StreamTotals(resets=self.totals.resets, unexpected=self.totals.unexpected, dropped=self.totals.dropped)
        for s in self.streams:
            if s.ready.done() and s.ready.result():
                out.add(s.tracker, expected.get(s.channel, 0))
        return out

    def _settle(self, s: _Stream) -> None:
        if s.expected is None or s.settled:
            return
        s.settled = True
        self._unsettled -= 1
        if self._unsettled == 0:
            self._all_settled.set()

    def _ssl_context(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        if endpoint.scheme != "https":
            return None
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(
        self, s: _Stream, headers: dict[str, str], *, wait_ready: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, BodyDecoder, SSEParser]:
        """Open the stream; with `wait_ready`, also read until the adapter says it is live. Raises _Refused, with a
        short countable reason, when it fails; the socket is then closed."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                ep = s.endpoint
                reader, writer = await asyncio.open_connection(
                    ep.host, ep.port, ssl=self._ssl_context(ep), local_addr=s.source
                )
                writer.write(build_get(ep, headers))
                head = parse_head(await reader.readuntil(b"\r\n\r\n"))
                if head.status != 200:
                    raise _Refused(f"http_{head.status}")
                decoder = body_decoder(head)
                parser = SSEParser()
                while wait_ready and not self.adapter.stream_ready(parser):
                    data = await reader.read(_READ_BYTES)
                    if not data:
                        raise _Refused("closed")
                    now = time.time()
                    self._deliver(s, parser.feed(decoder.feed(data)), now)
                    s.last_id = parser.last_event_id
                    if decoder.done:
                        raise _Refused("ended")
                return reader, writer, decoder, parser
        except BaseException as e:
            if writer is not None:
                writer.close()
            if isinstance(e, OSError | EOFError | asyncio.LimitOverrunError | HttpError | TimeoutError):
                raise _Refused(_reason(e)) from e
            raise

    async def _run(self, s: _Stream) -> None:
        ctx = self.ctx
        writer: asyncio.StreamWriter | None = None
        started = time.perf_counter()
        try:
            try:
                reader, writer, decoder, parser = await self._connect(s, self.headers, wait_ready=True)
            except _Refused as e:
                ctx.tick.failed += 1
                ctx.tick.error(e.reason)
                s.ready.set_result(False)
                return
            ctx.tick.opened += 1
            ctx.tick.connect_us.add(round((time.perf_counter() - started) * 1_000_000))
            ctx.open += 1
            s.ready.set_result(True)
            try:
                await self._read(s, reader, decoder, parser)
            finally:
                ctx.open -= 1
        finally:
            if not s.ready.done():
                s.ready.set_result(False)  # cancelled while connecting: the run is closing
            if writer is not None:
                await _close(writer)

    # -- reconnect storm ----------------------------------------------------------------------------------------------

    async def storm(self, timeout_s: float) -> None:
        """Drop every live stream at once, reconnect them all at once with `Last-Event-ID`, and wait (up to
        `timeout_s`) until each has caught up: received an event published after its reconnect was answered, which,
        with the sequence checks, means it has everything before. The same delivery records carry on."""
        live = [s for s in self.streams if s.task is not None and not s.task.done()]
        self._storm_t0 = time.time()
        for s in live:
            assert s.task is not None
            s.task.cancel()
        await asyncio.gather(*(s.task for s in live if s.task is not None), return_exceptions=True)
        self._catching = self._answering = len(live)
        if not live:
            self._all_caught_up.set()
            self.ctx.send("answered")
        for s in live:
            s.task = asyncio.create_task(self._rerun(s))
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._all_caught_up.wait()

    async def _rerun(self, s: _Stream) -> None:
        ctx = self.ctx
        writer: asyncio.StreamWriter | None = None
        headers = {**self.headers, "Last-Event-ID": s.last_id} if s.last_id else self.headers
        try:
            try:
                # A resumed stream may have nothing to replay and no id to show until the next event: its 200 is
                # the sign it is in place.
                reader, writer, decoder, parser = await self._connect(s, headers, wait_ready=False)
            except _Refused as e:
                self._answered()
                ctx.tick.error(f"reconnect_{e.reason}")
                self.reconnect_failed += 1
                self._caught_up(s)
                return
            self._answered()
            s.resumed_at = time.time()
            self.reconnect_us.add(round((s.resumed_at - self._storm_t0) * 1_000_000))
            ctx.open += 1
            try:
                await self._read(s, reader, decoder, parser)
            finally:
                ctx.open -= 1
        finally:
            if writer is not None:
                await _close(writer)

    def _answered(self) -> None:
        self._answering -= 1
        if self._answering == 0:
            # The parent reads the store's command counters now: the storm's requests are all in.
            self.ctx.send("answered")

    def _caught_up(self, s: _Stream) -> None:
        s.resumed_at = None
        self._catching -= 1
        if self._catching == 0:
            self._all_caught_up.set()

    def storm_result(self) -> dict[str, Any]:
        return {
            "catch_up_us": self.catch_up_us,
            "reconnect_us": self.reconnect_us,
            "reconnect_failed": self.reconnect_failed,
            "not_caught_up": self._catching,
        }

    async def _read(self, s: _Stream, reader: asyncio.StreamReader, decoder: BodyDecoder, parser: SSEParser) -> None:
        try:
            while True:
                data = await reader.read(_READ_BYTES)
                if not data:
                    break
                now = time.time()
                events = parser.feed(decoder.feed(data))
                if events:
                    self._deliver(s, events, now)
                    s.last_id = parser.last_event_id
                if decoder.done:
                    break
        except (OSError, HttpError) as e:
            self.ctx.tick.error(f"stream_{_reason(e)}")
        # Only a stream that ended by itself gets here: closing the pool cancels this task instead.
        self.totals.dropped += 1
        self.ctx.tick.dropped += 1
        self._settle(s)

    def _deliver(self, s: _Stream, events: list[SSEEvent], now: float) -> None:
        tick = self.ctx.tick
        latency = tick.latency_us
        name = self.adapter.event_name
        tracker = s.tracker
        sent = 0.0
        for ev in events:
            decoded = decode_data(ev.data) if ev.event == name else None
            if decoded is None:
                if ev.event == "reset":
                    self.totals.resets += 1
                else:
                    self.totals.unexpected += 1
                continue
            sent, seq = decoded
            tracker.see(seq)
            latency.add(round((now - sent) * 1_000_000))
            tick.delivered += 1
        if s.resumed_at is not None and sent >= s.resumed_at:
            self.catch_up_us.add(round((now - self._storm_t0) * 1_000_000))
            self._caught_up(s)
        if s.expected is not None and not s.settled and tracker.complete(s.expected):
            self._settle(s)


async def subscribe_role(ctx: WorkerContext, job: SubscribeJob) -> None:
    """Open the job's streams and say `ready`; on `storm` ({"timeout_s"}) drop and resume them all at once, say
    `answered` once every reconnect has its answer and `stormed` with the catch-up figures; on `finish`
    ({"expected": {channel: events}, "timeout_s"}) wait for the expected events and say `drained`; on `close` close
    every stream and send `done` with the delivery record."""
    pool = SubscriberPool(ctx, job)
    try:
        began = time.time()
        await pool.open_all()
        # When this worker began opening its streams and when the last was live: the ramp the server sustained.
        ctx.ready({"began": began, "ended": time.time()})
        kind, payload = await ctx.command()
        if kind == "storm":
            await pool.storm(payload["timeout_s"])
            ctx.send("stormed", pool.storm_result())
            kind, payload = await ctx.command()
        if kind != "finish":
            raise RuntimeError(f"subscriber: unexpected command {kind!r}")
        expected: Mapping[str, int] = payload["expected"]
        await pool.drain(expected, payload["timeout_s"])
        # The parent samples the hub now, before the connections close: tearing them down is no cost of delivery.
        ctx.send("drained")
        kind, _ = await ctx.command()
        if kind != "close":
            raise RuntimeError(f"subscriber: unexpected command {kind!r}")
    finally:
        await pool.close()
    ctx.finish("done", pool.result(expected))


# -- publishers -----------------------------------------------------------------------------------------------------


async def _publish_once(
    ctx: WorkerContext,
    adapter: Adapter,
    session: aiohttp.ClientSession,
    base: str,
    channel: str,
    datas: list[str],
    headers: Mapping[str, str],
) -> int:
    """One publish request, counted into the tick; returns the events accepted (on failure, those the server says it
    stored before failing, usually 0)."""
    started = time.perf_counter()
    accepted = 0
    try:
        n = await adapter.publish(session, base, channel, datas, headers)
    except PublishError as e:
        reason, accepted = e.reason, e.accepted
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        reason = _reason(e)
    else:
        tick = ctx.tick
        tick.request_us.add(round((time.perf_counter() - started) * 1_000_000))
        tick.requests += 1
        tick.published += n
        return n
    ctx.tick.publish_errors += 1
    ctx.tick.error(f"publish_{reason}")
    ctx.tick.published += accepted
    return accepted


@dataclass(frozen=True, slots=True)
class FanoutPublishJob:
    target: str
    urls: tuple[str, ...]  # publish requests go round-robin over these
    channels: tuple[str, ...]
    rate_per_s: float  # events per second over all channels
    batch: int  # events per request (all to one channel)
    payload_bytes: int
    duration_s: float
    events: int | None  # publish this many in total instead of running for duration_s
    token: str | None


async def fanout_publisher_role(ctx: WorkerContext, job: FanoutPublishJob) -> None:
    """On `start`, publish at the job's rate, request k to channel k mod M; then send `done` with the events
    published per channel (what each subscriber must receive), the elapsed time and the worst schedule lag."""
    adapter = ADAPTERS[job.target]()
    async with _session(len(job.channels)) as session:
        ctx.ready()
        kind, _ = await ctx.command()
        if kind != "start":
            raise RuntimeError(f"publisher: unexpected command {kind!r}")
        started = time.perf_counter()
        published, behind_s = await _paced_publish(ctx, adapter, session, job)
        elapsed_s = time.perf_counter() - started
    ctx.finish(
        "done",
        {"published": dict(zip(job.channels, published, strict=True)), "elapsed_s": elapsed_s, "behind_s": behind_s},
    )


async def _paced_publish(
    ctx: WorkerContext, adapter: Adapter, session: aiohttp.ClientSession, job: FanoutPublishJob
) -> tuple[list[int], float]:
    headers = _auth(job.token)
    padding = "x" * job.payload_bytes
    n_channels = len(job.channels)
    seqs = [0] * n_channels
    # Requests to one channel go one at a time: two in flight could be appended in either order, and the subscribers
    # would then report the load tester's own reordering. Different channels proceed concurrently.
    locks = [asyncio.Lock() for _ in job.channels]

    async def send(k: int, size: int) -> None:
        c = k % n_channels
        async with locks[c]:
            first = seqs[c]
            # The send time is taken after the lock: latency is the server's, not this client's queue. A request
            # that fails is not retried and its sequence numbers are used again; should it have been appended all
            # the same (a timeout), the subscribers count duplicates, and the publish error is in the report.
            sent = time.time()
            datas = [encode_data(sent, first + i, padding) for i in range(size)]
            seqs[c] = first + await _publish_once(
                ctx, adapter, session, job.urls[k % len(job.urls)], job.channels[c], datas, headers
            )

    loop = asyncio.get_running_loop()
    interval_s = job.batch / job.rate_per_s
    t0 = loop.time()
    remaining = job.events
    behind_s = 0.0
    pending: set[asyncio.Task[None]] = set()
    k = 0
    while True:
        at = t0 + k * interval_s
        if remaining is None:
            if at >= t0 + job.duration_s:
                break
            size = job.batch
        else:
            if remaining <= 0:
                break
            size = min(job.batch, remaining)
            remaining -= size
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            behind_s = max(behind_s, -delay)
        task = asyncio.create_task(send(k, size))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if len(pending) >= _MAX_PENDING:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        k += 1
    await asyncio.gather(*pending)
    return seqs, behind_s


@dataclass(frozen=True, slots=True)
class PublishLoopsJob:
    target: str
    urls: tuple[str, ...]
    channels: tuple[str, ...]  # one per loop: each loop publishes to its own channel, one request at a time
    rate_per_s: float  # this worker's share of the events per second; 0: as fast as the server answers
    payload_bytes: int
    duration_s: float  # of each phase
    events: int | None  # this worker's share of the events of each phase, instead of duration_s
    token: str | None


async def publish_loops_role(ctx: WorkerContext, job: PublishLoopsJob) -> None:
    """For each `start` ({"batch": B}): run the loops for one phase, then send `done` with the phase's elapsed time.
    The counts come in the ticks. Ends on `stop`."""
    adapter = ADAPTERS[job.target]()
    async with _session(len(job.channels)) as session:
        ctx.ready()
        while True:
            kind, payload = await ctx.command()
            if kind != "start":
                raise RuntimeError(f"publish loops: unexpected command {kind!r}")
            started = time.perf_counter()
            await _publish_phase(ctx, adapter, session, job, int(payload["batch"]))
            ctx.finish("done", {"elapsed_s": time.perf_counter() - started})


async def _publish_phase(
    ctx: WorkerContext, adapter: Adapter, session: aiohttp.ClientSession, job: PublishLoopsJob, batch: int
) -> None:
    headers = _auth(job.token)
    padding = "x" * job.payload_bytes
    loop = asyncio.get_running_loop()
    n_loops = len(job.channels)
    # Each loop paces itself; loops start staggered so the requests spread evenly over time.
    interval_s = batch * n_loops / job.rate_per_s if job.rate_per_s > 0 else 0.0
    t0 = loop.time()
    end = t0 + job.duration_s
    budget: list[int] | None = [job.events] if job.events is not None else None  # shared by the loops

    async def one(i: int) -> None:
        base = job.urls[i % len(job.urls)]
        seq = 0
        k = 0
        while True:
            if budget is not None:
                if budget[0] <= 0:
                    return
                size = min(batch, budget[0])
                budget[0] -= size
            elif loop.time() >= end:
                return
            else:
                size = batch
            if interval_s:
                delay = t0 + (k + i / n_loops) * interval_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            datas = [encode_data(time.time(), seq + j, padding) for j in range(size)]
            seq += await _publish_once(ctx, adapter, session, base, job.channels[i], datas, headers)
            k += 1

    await asyncio.gather(*(one(i) for i in range(n_loops)))


@dataclass(frozen=True, slots=True)
class GenerationsJob:
    redis_url: str  # the hub's Redis: tokens are appended straight to it, as producer workers do
    key_prefix: str
    history: int  # the hub's --history and --ttl, which the append script applies
    ttl_s: float
    channels: tuple[str, ...]  # one generation per channel
    rate_per_s: float  # tokens per second over all channels
    payload_bytes: int
    duration_s: float
    coalesce_ms: float  # the producer's --coalesce-ms


async def generations_role(ctx: WorkerContext, job: GenerationsJob) -> None:
    """On `start`, write one generation per channel at the job's token pace, the way producer workers do: through
    the producer's own Coalescer (fenced, coalesced appends in one round trip) into the hub's Redis. Then send `done`
    with the tokens stored per channel, the elapsed time and the worst schedule lag."""
    # Imported here: only this role needs the producer and Redis code, and the other roles start faster without.
    from prometheus_client import CollectorRegistry

    from producer.coalesce import Coalescer
    from producer.metrics import ProducerMetrics
    from ssecore.backend import Fence, NewEvent
    from ssecore.backend_redis import RedisBackend

    backend = RedisBackend(job.redis_url, prefix=job.key_prefix, history=job.history, ttl_s=job.ttl_s, timeout_s=10.0)
    coalescer = Coalescer(backend, ProducerMetrics(CollectorRegistry()), window_s=job.coalesce_ms / 1000)
    n = len(job.channels)
    padding = "x" * job.payload_bytes
    fences = [Fence(f"loadtest:{c}", 1) for c in job.channels]
    stored = [0] * n
    seqs = [0] * n
    # Each token's channel and future, oldest first. Counted by looking at the oldest once a tick rather than by a
    # callback per token: on these cores the writer must cost little beside the hub it measures.
    pending: deque[tuple[int, asyncio.Future[str]]] = deque()

    def count() -> None:
        while pending and pending[0][1].done():
            k, f = pending.popleft()
            if f.cancelled() or f.exception() is not None:
                ctx.tick.publish_errors += 1
                ctx.tick.error("append_failed")
            else:
                stored[k] += 1
                ctx.tick.published += 1

    try:
        ctx.ready()
        kind, _ = await ctx.command()
        if kind != "start":
            raise RuntimeError(f"generations: unexpected command {kind!r}")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        total = round(job.rate_per_s * job.duration_s)
        written = 0
        behind_s = 0.0
        # One pacing loop for every generation: token j goes to channel j mod n, so each channel gets rate/n
        # tokens a second, evenly spread, with no task per generation.
        while written < total:
            due = min(total, int((loop.time() - t0) * job.rate_per_s) + 1)
            behind_s = max(behind_s, (due - written) / job.rate_per_s - _TICK_S)
            for j in range(written, due):
                k = j % n
                data = encode_data(time.time(), seqs[k], padding)
                fence = fences[k] if seqs[k] else Fence(fences[k].owner, 1, take=True)
                seqs[k] += 1
                pending.append((k, coalescer.add(job.channels[k], NewEvent("lt", data), fence)))
            written = due
            count()
            await asyncio.sleep(_TICK_S)
        if pending:
            await asyncio.wait([f for _, f in pending])
        count()
        elapsed_s = loop.time() - t0
    finally:
        await coalescer.aclose()
        await backend.aclose()
    ctx.finish(
        "done",
        {"published": dict(zip(job.channels, stored, strict=True)), "elapsed_s": elapsed_s, "behind_s": behind_s},
    )


Role = Callable[[WorkerContext, Any], Coroutine[Any, Any, None]]

ROLES: dict[str, Role] = {
    "subscribe": subscribe_role,
    "fanout-publisher": fanout_publisher_role,
    "publish-loops": publish_loops_role,
    "generations": generations_role,
}
