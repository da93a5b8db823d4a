"""Fanout: one live read per active channel per node, each event encoded once, the same bytes to every subscriber.

A single task tails every channel that has local subscribers through one `TailReader` (on Redis: the rings its appends
publish, on one subscribing connection). Subscribers are not tasks and have no queues: an event batch, encoded once,
is written straight to each subscriber whose handler is parked, or appended, as one shared bytes object, to its
pending list for its own request handler to write out in one write.
A subscriber that stops reading passes `max_buffer_bytes` and is cut off; it loses nothing, as it resumes by id.

Ownership (see hub.ownership) is settled when data first flows, not by a broadcast: a stream admitted to a channel that
had no owner yet is provisional, and before the first entries reach it the channel's owner is looked up once; one that
may not reach it is parked (it stays open, with heartbeats, and never gets an event), the rest follow as any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from ssecore.backend import (
    Backend,
    BackendUnavailable,
    ChannelInfo,
    Entry,
    Reset,
    StreamKey,
    TailReader,
    format_id,
    parse_id,
)
from ssecore.presence import PRESENCE_INTERVAL_S, Presence
from ssecore.sse import comment, encode_event

from .metrics import HubMetrics
from .settings import TAIL_BACKOFF_MAX_S
from .transcode import ALL, Batch, Feed, Transcoding, View, select

__all__ = ["Fanout", "Replayed", "Subscriber", "encode_reset", "reset_data"]

log = logging.getLogger(__name__)

_HEARTBEAT = comment("keep-alive")
_BACKOFF_MIN_S = 0.05


class _Transport(Protocol):
    def get_write_buffer_size(self) -> int: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: ...
    def write(self, data: bytes, /) -> None: ...
    def writelines(self, data: Iterable[bytes], /) -> None: ...
    def close(self) -> None: ...


def reset_data(reset: Reset) -> str:
    return orjson.dumps(
        {"reason": reset.reason, "requested": reset.requested, "continue_after": reset.continue_after}
    ).decode()


def encode_reset(reset: Reset) -> bytes:
    """The in-band `reset` event. Its id is where the stream continues after, so a reconnect does not repeat it."""
    return encode_event(reset.continue_after, "reset", reset_data(reset))


def _may_follow(owner: str | None, client: str) -> bool:
    # The rule of hub.ownership for a stream whose token reaches the channel by a pattern only.
    return owner is None or owner == client


class Subscriber:
    """One open SSE stream: a pending-bytes list its handler drains, and the id of the last event handed to it.

    While its handler is parked with everything written (`next_chunk` waiting), bytes pushed are written straight to
    the connection's transport, framed as an HTTP/1.1 chunk when the response is chunked: no task wakes per event.
    Otherwise they queue, in order, for the handler to write in one go. Once the stream is handed over (hub.handover)
    there is no handler: every push is written straight away, and `end()` completes the response and closes.

    A stream in another API's format reads the channel through its `view` of a feed (hub.transcode).
    """

    __slots__ = (
        "__weakref__",
        "_pending",
        "_pending_bytes",
        "_waiter",
        "channel",
        "chunked",
        "cut",
        "direct",
        "native",
        "ended",
        "handed_over",
        "last_key",
        "max_buffer_bytes",
        "provisional",
        "transport",
        "view",
    )

    def __init__(self, channel: str, transport: _Transport | None, max_buffer_bytes: int) -> None:
        self.channel = channel
        self.transport = transport
        self.max_buffer_bytes = max_buffer_bytes
        # The response body uses HTTP/1.1 chunked coding; the handler sets it from the prepared response.
        self.chunked = True
        self.direct = False  # the handler is parked with nothing unwritten: push may write to the transport
        # The handler writes the fan-out's bytes as they are: else (another API's format) it must see every push.
        self.native = True
        self.handed_over = False  # no handler any more (hub.handover): this object writes and ends the stream
        self.last_key: StreamKey = (0, 0)
        self.ended = False  # no more data will come; the handler finishes after writing what is pending
        self.cut = False  # cut off as a slow consumer
        # The client this stream counts as, while its right to the channel waits on the channel's owner (it was
        # admitted when the channel had none, by a token pattern): None once it may follow whatever comes.
        self.provisional: str | None = None
        self.view: View | None = None  # how it reads the channel in another API's format; None: native
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._waiter: asyncio.Future[None] | None = None

    def push(self, data: bytes, last_key: StreamKey | None = None, *, end: bool = False) -> bool:
        """Queue bytes for the handler. Returns False if this made the subscriber a slow consumer (now cut off)."""
        if self.ended:
            return True
        # Judge by what is still unsent *before* this push: one batch larger than the bound, sent to a client that
        # keeps up, is not a slow consumer; a client that has not taken the previous bytes is.
        buffered = self._pending_bytes + (self.transport.get_write_buffer_size() if self.transport else 0)
        if buffered > self.max_buffer_bytes:
            self._cut_off()
            return False
        if last_key is not None:
            self.last_key = last_key
        t = self.transport
        if self.direct and t is not None and not t.is_closing():
            t.writelines((b"%x\r\n" % len(data), data, b"\r\n") if self.chunked else (data,))
            if end:
                self.end()
            return True
        self._pending.append(data)
        self._pending_bytes += len(data)
        if end:
            self.end()
        else:
            self._wake()
        return True

    def end(self) -> None:
        """Finish the stream after what is already pending."""
        view = self.view
        if view is not None and view.shared is not None and not self.ended:
            # Not for a connection already gone (a handed-over stream learns that here): nobody would read it.
            if self.transport is None or not self.transport.is_closing():
                view.ending = view.source(self.last_key).ending()
                if self.handed_over and view.ending:
                    self.push(view.ending)
        if self.handed_over:
            if not self.ended and self.transport is not None and not self.transport.is_closing():
                if self.chunked:
                    self.transport.writelines((b"0\r\n\r\n",))  # the last chunk: the response is complete
                self.transport.close()
            self.ended = True
            return
        self.ended = True
        self._wake()

    def take_pending(self) -> bytes | None:
        """Everything queued for the handler, joined; None when nothing is."""
        if not self._pending:
            return None
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        self._pending_bytes = 0
        return data

    def hand_over(self) -> None:
        """From now on this writes every push straight to the transport, and `end()` finishes the response."""
        self.handed_over = True
        self.direct = True

    def _cut_off(self) -> None:
        self.cut = True
        self.ended = True
        self._pending.clear()
        self._pending_bytes = 0
        if self.transport is not None:
            # The handler may be blocked in a drain that would never finish; aborting wakes it with an error.
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next_chunk(self) -> bytes | None:
        """Wait for pending bytes and take them all, joined; None once the stream is over and everything was taken."""
        while not self._pending:
            if self.ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            # Everything handed to this handler is written: from now on pushes go straight to the transport.
            self.direct = self.native
            try:
                await self._waiter
            finally:
                self.direct = False
                self._waiter = None
        return self.take_pending()


@dataclass(frozen=True, slots=True)
class Replayed:
    """A page of history a catch-up has just written: the position it followed, and each entry's key and bytes."""

    after: StreamKey
    keys: list[StreamKey]
    chunks: list[bytes]


class _Channel:
    """A channel this node tails: its read position, its subscribers, and a window of its latest encoded events.

    The window holds the events after `window_base`, contiguous (each one's `prev` was checked on dispatch), up to
    `window_cap` bytes. A client that resumes from an id in it is served from memory: a storm of reconnects costs the
    store nothing as long as the clients come back within the window (and the linger, for a channel left idle).
    """

    __slots__ = (
        "feeds",
        "idle_since",
        "owner",
        "owner_known",
        "position",
        "provisional",
        "subscribers",
        "window_base",
        "window_bytes",
        "window_data",
        "window_keys",
    )

    def __init__(self, position: str) -> None:
        self.position = position  # id of the last entry read from the backend for this channel (or where it started)
        self.subscribers: set[Subscriber] = set()
        self.provisional = 0  # how many of them are provisional: while 0, dispatch does nothing about owners
        # The owner, once looked up after entries were read: the stream exists then, and keeps its owner until it is
        # deleted (which drops this object), so the answer holds for every stream that joins later.
        self.owner_known = False
        self.owner: str | None = None
        self.idle_since = 0.0  # monotonic time the last subscriber left (meaningful only while it has none)
        self.window_base: StreamKey = parse_id(position)
        self.window_keys: deque[StreamKey] = deque()
        self.window_data: deque[bytes] = deque()
        self.window_bytes = 0
        # Its encoders for other APIs' formats (hub.transcode), by key; kept while the channel is, like the window.
        self.feeds: dict[Hashable, Feed] = {}

    def remember(self, keys: Sequence[StreamKey], chunks: Sequence[bytes], cap: int) -> None:
        """Add events that follow the window's last one (or its base) and drop the oldest beyond `cap` bytes."""
        if cap <= 0:
            self.window_base = keys[-1]  # no window: a resume is served here only from the tail's own position
            return
        self.window_keys.extend(keys)
        self.window_data.extend(chunks)
        self.window_bytes += sum(len(c) for c in chunks)
        while self.window_bytes > cap and self.window_keys:
            self.window_base = self.window_keys.popleft()
            self.window_bytes -= len(self.window_data.popleft())

    def _start(self, key: StreamKey) -> int | None:
        # Only exact ids: a position that is not an id of this stream is the store's to judge (check_position).
        if key == self.window_base:
            return 0
        i = bisect_left(self.window_keys, key)
        if i == len(self.window_keys) or self.window_keys[i] != key:
            return None
        return i + 1

    def holds(self, key: StreamKey) -> bool:
        return self._start(key) is not None

    def replay_after(self, key: StreamKey) -> bytes | None:
        """The encoded events after `key`, if `key` is the window's base or one of its events' ids; else None."""
        start = self._start(key)
        if start is None:
            return None
        data = self.window_data
        return b"".join(itertools.islice(data, start, None)) if start < len(data) else b""


class Fanout:
    def __init__(
        self,
        backend: Backend,
        metrics: HubMetrics,
        *,
        block_s: float,
        heartbeat_s: float,
        presence: Presence | None = None,
        window_bytes: int = 0,
        linger_s: float = 0.0,
        stuck_after_s: float = 60.0,
    ) -> None:
        self._backend = backend
        self._presence = presence
        self._metrics = metrics
        self._block_s = block_s
        self._heartbeat_s = heartbeat_s
        self._window_bytes = window_bytes
        self._linger_s = linger_s
        self._stuck_after_s = stuck_after_s
        self._channels: dict[str, _Channel] = {}
        # Each tailed channel's position, kept beside `_channels` so that a read copies it in one step instead of
        # building it channel by channel on every round: a node may tail thousands.
        self._positions: dict[str, str] = {}
        self._next_expiry = math.inf  # monotonic time the first idle channel's linger ends (inf: none is idle)
        self._subscribers: set[Subscriber] = set()
        self._reader: TailReader | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()
        self._interrupt_task: asyncio.Task[None] | None = None
        self._kick_again = False
        self._stopping = False
        self._draining = False
        self._tail_ok = True  # False while the live tail cannot read the backend
        self._released = True  # the reader holds nothing for channels (no subscription, no ring kept)
        self._info_reads: dict[str, asyncio.Future[ChannelInfo | None]] = {}  # see channel_info

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._reader = await self._backend.open_reader()
        liveness = self._metrics.liveness
        liveness.watch("tail", self._stuck_after_s)
        # Each of these rounds is its wait and (presence, on Redis) a call bounded by --redis-timeout, which the
        # tail's bound already exceeds: a presence loop failing because Redis is down still goes round in time.
        liveness.watch("heartbeat", self._heartbeat_s + self._stuck_after_s)
        if self._presence is not None:
            liveness.watch("presence", PRESENCE_INTERVAL_S + self._stuck_after_s)
        self._tasks = [
            asyncio.create_task(self._tail_loop(), name="fanout-tail"),
            asyncio.create_task(self._heartbeat_loop(), name="fanout-heartbeat"),
        ]
        if self._presence is not None:
            self._tasks.append(asyncio.create_task(self._presence_loop(), name="fanout-presence"))

    @property
    def healthy(self) -> bool:
        """The live tail is running and its last read succeeded (readiness)."""
        return self._tail_ok and bool(self._tasks) and not self._tasks[0].done()

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        tasks = [*self._tasks, *([self._interrupt_task] if self._interrupt_task is not None else [])]
        for t in tasks:
            t.cancel()
        # Each task's own failure (an interrupt that met a closed store, say) is irrelevant once stopping.
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in ("tail", "heartbeat", "presence"):
            self._metrics.liveness.forget(name)
        if self._reader is not None:
            await self._reader.aclose()

    async def drain(self, spread_s: float, wait_s: float) -> None:
        """End every stream, spread at random over `spread_s` so clients do not all reconnect at once, and wait
        up to `wait_s` for their handlers to finish writing."""
        self._draining = True
        loop = asyncio.get_running_loop()
        subs = list(self._subscribers)
        for sub in subs:
            loop.call_later(random.uniform(0, spread_s), sub.end)
        deadline = loop.time() + wait_s
        while self._subscribers and loop.time() < deadline:  # noqa: ASYNC110 - bounded wait on handlers we don't own
            await asyncio.sleep(0.05)

    # -- subscribers --------------------------------------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def register(self, sub: Subscriber) -> None:
        """Count a stream as open (it gets heartbeats and drain) before it has caught up."""
        self._subscribers.add(sub)
        self._metrics.connections_open.set(len(self._subscribers))
        if self._draining:
            # Accepted just before the drain began: it ends after its catch-up, like the others.
            sub.end()

    def feed(self, sub: Subscriber, transcoding: Transcoding) -> Feed:
        """A new feed for a stream that catches up in another format: its encoder takes the history the stream
        replays, and the feed joins the channel's with the stream (see `try_attach`). A stream's own (no key) keeps
        nothing: nobody else could be served from it."""
        shared = transcoding.key is not None
        own = Feed(transcoding.encoder, transcoding.key if shared else sub, self._window_bytes if shared else 0)
        sub.view = View(own, transcoding.skip)
        return own

    def try_attach(
        self, sub: Subscriber, position: str, replayed: Replayed | None = None, feed: Feed | None = None
    ) -> bool:
        """Join the live feed at `position` if this node's tail is not ahead of it.

        False means the tail has already passed `position`: the caller reads the history in between and tries again.
        Synchronous, so nothing can be dispatched between the check and the join: no gap, no duplicate.
        `replayed` is the history page the caller has just sent, ending at `position`: a channel this attach starts
        tailing keeps it as its resume window, so the next clients resuming near here need not ask the store.
        `feed`: the stream reads another format, and `feed` has taken the history up to `position`.
        """
        key = parse_id(position)
        ch = self._channels.get(sub.channel)
        if ch is None:
            ch = self._channels[sub.channel] = _Channel(format_id(key))
            self._positions[sub.channel] = ch.position
            if replayed is not None and replayed.keys and replayed.keys[-1] == key:
                ch.window_base = replayed.after
                ch.remember(replayed.keys, replayed.chunks, self._window_bytes)
            self._metrics.channels_active.set(len(self._channels))
            self._kick_reader()
        elif parse_id(ch.position) > key:
            return False
        if self._join(ch, sub, key) and feed is not None:
            self._join_feed(ch, sub, feed)
        return True

    def _join_feed(self, ch: _Channel, sub: Subscriber, feed: Feed) -> None:
        view = sub.view
        if sub.ended or view is None:
            return  # it ends as it is, with its own encoder's ending (its handler writes it)
        if feed.reset:
            # Its catch-up met a reset the channel's other streams did not: its encoder is its own alone.
            feed.key = sub
        shared = ch.feeds.get(feed.key)
        if shared is None:
            shared = ch.feeds[feed.key] = feed
        elif feed.position < shared.position:
            shared.adopt(feed)
        shared.subscribers.add(sub)
        view.shared = shared

    def has_feed(self, channel: str, key: Hashable | None) -> bool:
        """Whether `resume_feed` would serve a stream of this channel in that format now."""
        ch = self._channels.get(channel)
        shared = ch.feeds.get(key) if ch is not None and key is not None else None
        return shared is not None and shared.kept is not None

    def resume_feed(self, sub: Subscriber, key: Hashable) -> bool:
        """Serve a stream in another format from the channel's feed for it, if this node has one that kept every unit
        it made: join it and queue the units after the stream's `skip`, with neither a store read nor a replay.
        False: it has none.
        """
        ch = self._channels.get(sub.channel)
        shared = ch.feeds.get(key) if ch is not None else None
        view = sub.view
        if ch is None or shared is None or shared.kept is None or view is None:
            return False
        if shared.kept and sub.provisional is not None and not ch.owner_known:
            return False  # events whose owner this node has not looked up: the caller reads them from the store
        if self._join(ch, sub, shared.position) and not sub.ended:
            shared.subscribers.add(sub)
            view.shared = shared
            missed = select(shared.kept, ALL, view.skip)
            if missed:
                sub.push(missed, shared.position)
        return True

    def resume(self, sub: Subscriber, position: str) -> bool:
        """Serve a resume from the channel's window, if this node tails the channel and `position` is in it: join the
        live feed and queue the missed events for the handler, without asking the store. False: not in the window.
        """
        ch = self._channels.get(sub.channel)
        if ch is None:
            return False
        key = parse_id(position)
        missed = ch.replay_after(key)
        if missed is None or (missed and sub.provisional is not None and not ch.owner_known):
            # Events whose owner this node has not looked up: the caller reads them from the store and checks.
            return False
        if self._join(ch, sub, key) and missed:
            sub.push(missed, parse_id(ch.position))
        return True

    def can_resume(self, channel: str, position: str) -> bool:
        """Whether `resume` would serve this position now (the handler then skips its first history read)."""
        ch = self._channels.get(channel)
        return ch is not None and ch.holds(parse_id(position))

    async def channel_info(self, channel: str) -> ChannelInfo | None:
        """The store's view of a channel, read once for all the streams that ask while a read is under way. In a
        reconnect storm thousands of streams start on a few channels before this node tails them: each asking the
        store on its own would cost a round trip per stream and keep every one of them waiting, all at once, which
        leaves the node's memory at the storm's peak. A stream that joins a read begun just before it came may start
        a few events earlier than it would have: never later, so it misses nothing."""
        read = self._info_reads.get(channel)
        if read is None:
            self._metrics.subscribe_reads.inc()
            read = self._info_reads[channel] = asyncio.ensure_future(self._backend.info(channel))
            read.add_done_callback(lambda done: self._info_read_done(channel, done))
        return await asyncio.shield(read)

    def _info_read_done(self, channel: str, read: asyncio.Future[ChannelInfo | None]) -> None:
        if self._info_reads.get(channel) is read:
            del self._info_reads[channel]
        if not read.cancelled():
            read.exception()  # retrieved: every stream that waited had its own answer

    def live_position(self, channel: str) -> str | None:
        """Where a live (non-resuming) subscriber may join a channel this node already tails: every entry after it
        will be dispatched here. None when the channel is not tailed: ask the store."""
        ch = self._channels.get(channel)
        return ch.position if ch is not None else None

    def _join(self, ch: _Channel, sub: Subscriber, key: StreamKey) -> bool:
        """Add `sub` to the channel's feed; False if it was parked instead (see `park`)."""
        # If the subscriber is ahead of the tail, it skips what it already has (dispatch compares last_key).
        sub.last_key = key
        if sub.provisional is not None:
            if not ch.owner_known:
                ch.provisional += 1
            elif _may_follow(ch.owner, sub.provisional):
                sub.provisional = None
            else:
                self.park(sub)
                return False
        ch.subscribers.add(sub)
        return True

    def park(self, sub: Subscriber) -> None:
        """`sub` may not reach its channel: it stays open, counted and kept alive like any stream, and nothing of the
        channel ever comes to it, exactly as for a channel that does not exist (see hub.ownership)."""
        ch = self._channels.get(sub.channel)
        if ch is not None and sub in ch.subscribers:
            self._leave(ch, sub)
        if sub.view is not None and sub.view.shared is not None:
            sub.view.shared, sub.view.ending = None, b""  # it was shown nothing, so there is nothing to end
        sub.provisional = None

    def detach(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        self._metrics.connections_open.set(len(self._subscribers))
        ch = self._channels.get(sub.channel)
        if ch is not None and sub in ch.subscribers:
            self._leave(ch, sub)

    def _leave(self, ch: _Channel, sub: Subscriber) -> None:
        ch.subscribers.discard(sub)
        feed = sub.view.shared if sub.view is not None else None
        if feed is not None:
            feed.subscribers.discard(sub)
            if feed.key is sub:
                ch.feeds.pop(sub, None)  # this stream's own: nobody else reads it
        if sub.provisional is not None:
            ch.provisional -= 1
        if not ch.subscribers:
            # Tailed a while longer (the linger), not dropped here: clients that reconnect soon, all of them at once
            # after a network blip or a node's drain, resume from the window.
            ch.idle_since = time.monotonic()
            self._next_expiry = min(self._next_expiry, ch.idle_since + self._linger_s)

    def _drop(self, name: str) -> _Channel | None:
        """Stop tailing a channel."""
        ch = self._channels.pop(name, None)
        if ch is not None:
            del self._positions[name]
            self._metrics.channels_active.set(len(self._channels))
        return ch

    # -- the live tail ------------------------------------------------------------------------------------------------

    def break_channel(self, name: str, reason: str) -> None:
        """This node's view of a channel no longer matches the store (entries vanished, or the stream was recreated).

        End its streams and forget it: each client reconnects with its last id, and the catch-up tells it exactly
        what happened (`reset`) instead of the live feed silently skipping events.
        """
        ch = self._drop(name)
        if ch is None:
            return
        log.warning(
            "channel %s: live tail lost continuity (%s); ending %d streams so they resume",
            name,
            reason,
            len(ch.subscribers),
        )
        self._metrics.tail_breaks.inc()
        for sub in ch.subscribers:
            sub.end()

    def _kick_reader(self) -> None:
        self._wakeup.set()
        if self._reader is None:
            return
        if self._interrupt_task is not None and not self._interrupt_task.done():
            # That interrupt may already have ended the read that lacked this channel; send another when it is done.
            self._kick_again = True
            return
        self._kick_again = False
        self._interrupt_task = asyncio.create_task(self._reader.interrupt(), name="fanout-interrupt")
        self._interrupt_task.add_done_callback(self._interrupt_done)

    def _interrupt_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("tail interrupt failed: %r", exc)
        if self._kick_again and not self._stopping:
            self._kick_reader()

    def _snapshot(self) -> dict[str, _Channel]:
        now = time.monotonic()
        if now >= self._next_expiry:
            # Looked through only when a linger has ended, not on every round.
            self._next_expiry = math.inf
            for name, ch in list(self._channels.items()):
                if ch.subscribers:
                    continue
                if ch.idle_since + self._linger_s > now:
                    self._next_expiry = min(self._next_expiry, ch.idle_since + self._linger_s)
                else:
                    self._drop(name)
        return dict(self._channels)

    async def _tail_loop(self) -> None:
        assert self._reader is not None
        liveness = self._metrics.liveness
        backoff = _BACKOFF_MIN_S
        while not self._stopping:
            # Progress is going round, whether the last read succeeded or not (that is readiness's business).
            liveness.beat("tail")
            snapshot = self._snapshot()
            self._wakeup.clear()
            if not snapshot and self._released:
                # Nothing to follow: wait for a subscriber, but not for ever, so that this wait counts as going round
                # (and a linger that ends meanwhile is seen).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._block_s):
                        await self._wakeup.wait()
                continue
            try:
                # With no channel left, one read of none lets go of the reader's subscriptions and whatever it kept
                # for them: a node must not hold, nor buffer the rings of, channels nobody here watches.
                result = await self._reader.read(dict(self._positions), block_s=self._block_s if snapshot else 0.0)
                self._released = not snapshot
                self._tail_ok = True
                backoff = _BACKOFF_MIN_S
                for name in result.deleted:
                    self._on_deleted(name)
                for name in result.vanished:
                    self.break_channel(name, "the store no longer holds its last position")
                for name, entries in result.entries.items():
                    ch = snapshot.get(name)
                    # Apply only to the same channel object the read was made for: a channel dropped and re-added
                    # during the read starts from another position, and these entries may not fit it.
                    if entries and ch is not None and self._channels.get(name) is ch:
                        if ch.provisional:
                            # Rare: the first entries for streams admitted before the channel had an owner.
                            await self._settle_owner(name, ch)
                            if self._channels.get(name) is not ch:
                                continue
                        self._dispatch(name, ch, entries)
            except BackendUnavailable as e:
                self._tail_ok = False
                self._metrics.backend_errors.labels("tail").inc()
                log.warning("live tail read failed (%s); retrying in %.2fs", e, backoff)
            except Exception:
                # Whatever it is, the one task that feeds every subscriber of this node must not die of it.
                self._tail_ok = False
                self._metrics.backend_errors.labels("tail").inc()
                log.exception("live tail failed; retrying in %.2fs", backoff)
            else:
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, TAIL_BACKOFF_MAX_S)

    def _dispatch(self, name: str, ch: _Channel, entries: list[Entry]) -> None:
        head = entries[0]
        if head.prev is not None and head.prev != ch.position and parse_id(head.prev) != parse_id(ch.position):
            # Entries between our position and this one are gone (trimmed before we read them, or the stream was
            # lost and recreated). Delivering would be a silent gap.
            self.break_channel(name, f"expected an entry after {ch.position}, got one after {head.prev}")
            return
        encoded = [encode_event(e.id, e.event, e.data) for e in entries]
        payload = encoded[0] if len(encoded) == 1 else b"".join(encoded)
        first, last = entries[0].key, entries[-1].key
        end = entries[-1].close
        ch.position = self._positions[name] = entries[-1].id
        ch.remember([e.key for e in entries], encoded, self._window_bytes)
        now = time.time()
        lag = self._metrics.delivery_lag_seconds
        for e in entries:
            lag.observe(max(0.0, now - e.key[0] / 1000))
        delivered = 0
        cut = 0
        n_all = len(entries)
        # The same HTTP chunk goes to every chunked subscriber: framed once here, not once per subscriber.
        framed = b"%x\r\n%s\r\n" % (len(payload), payload)
        for sub in tuple(ch.subscribers):
            lk = sub.last_key
            if lk >= last or sub.view is not None:
                continue
            # The common case, inlined, since this loop runs once per subscriber per event: a handler parked with
            # nothing unwritten, a client that keeps up, all of the batch new to it. Anything else takes `push`, which
            # does the same and the rest.
            if lk < first and sub.direct and not end and not sub.ended:
                t = sub.transport
                if t is not None and t.get_write_buffer_size() <= sub.max_buffer_bytes and not t.is_closing():
                    t.write(framed if sub.chunked else payload)
                    sub.last_key = last
                    delivered += n_all
                    continue
            if lk < first:
                data, n = payload, n_all
            else:
                i = next(i for i, e in enumerate(entries) if e.key > lk)
                data, n = b"".join(encoded[i:]), len(entries) - i
            if sub.push(data, last, end=end):
                delivered += n
            else:
                cut += 1
                self._leave(ch, sub)
        for feed in tuple(ch.feeds.values()):
            d, c = self._dispatch_feed(ch, feed, entries)
            delivered += d
            cut += c
        if delivered:
            self._metrics.events_delivered.inc(delivered)
        if cut:
            self._metrics.slow_disconnects.inc(cut)
        if end:
            # Nothing can follow the close marker: release the channel.
            self._drop(name)

    def _dispatch_feed(self, ch: _Channel, feed: Feed, entries: list[Entry]) -> tuple[int, int]:
        """Encode a batch once in a feed's format and hand each of its streams what it lacks: (events delivered,
        streams cut off)."""
        batch = feed.take(entries)  # taken even by a feed nobody reads now: a stream joining later starts from it
        if not batch or not feed.subscribers:
            return 0, 0
        last, end = entries[-1].key, entries[-1].close
        head, first_unit = batch[0][0], batch[0][1]
        payload: bytes | None = None
        framed = b""
        delivered = cut = 0
        for sub in tuple(feed.subscribers):
            lk = sub.last_key
            if lk >= last or sub.view is None:
                continue
            skip = sub.view.skip
            if lk < head and skip <= first_unit:
                if payload is None:
                    payload = b"".join(u for _, _, units in batch for u in units)
                    # Framed once for all, as `_dispatch` frames the native bytes.
                    framed = b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b""
                # The common case, as in `_dispatch`: written straight to a parked handler's or handed-over stream's
                # transport, which keeps up.
                if payload and sub.direct and not end and not sub.ended:
                    t = sub.transport
                    if t is not None and t.get_write_buffer_size() <= sub.max_buffer_bytes and not t.is_closing():
                        t.write(framed if sub.chunked else payload)
                        sub.last_key = last
                        delivered += len(batch)
                        continue
                data, n = payload, len(batch)
            else:
                data, n = select(batch, lk, skip), sum(1 for key, _, _ in batch if key > lk)
            if not data:
                # Nothing in this format, or nothing the client lacks: no empty write, which would end a chunked body.
                sub.last_key = last
                if end:
                    sub.end()
            elif sub.push(data, last, end=end):
                delivered += n
            else:
                cut += 1
                self._leave(ch, sub)
        return delivered, cut

    async def _settle_owner(self, name: str, ch: _Channel) -> None:
        """Look up the owner of a channel whose entries are about to reach provisional subscribers, and let each of them
        follow or park it. Entries exist, so the owner cannot change any more (see `_Channel.owner_known`)."""
        try:
            owner = await self._backend.owner(name)
        except BackendUnavailable as e:
            # Undecided: they end, and their reconnects are authorized afresh. The others get the entries.
            log.info("channel %s: owner lookup failed (%s); ending its provisional streams", name, e)
            for sub in tuple(ch.subscribers):
                if sub.provisional is not None:
                    self._leave(ch, sub)
                    sub.provisional = None
                    sub.end()
            return
        if self._channels.get(name) is not ch:
            return
        ch.owner_known, ch.owner = True, owner
        for sub in tuple(ch.subscribers):
            if sub.provisional is None:
                continue
            if _may_follow(owner, sub.provisional):
                ch.provisional -= 1
                sub.provisional = None
            else:
                self.park(sub)

    def _on_deleted(self, name: str) -> None:
        ch = self._drop(name)
        if ch is None:
            return
        reset = Reset("deleted", "0-0", ch.position)
        data = encode_reset(reset)
        # The streams of a feed are told in their format, encoded once for them all (the reset ends the encoder).
        told_feeds: dict[int, Batch] = {}
        told = 0
        for sub in ch.subscribers:
            if sub.provisional is not None:
                # Not told what was there: it ends, and its reconnect is authorized afresh.
                sub.end()
                continue
            told += 1
            view = sub.view
            if view is None:
                sub.push(data, end=True)
                continue
            source = view.source(sub.last_key)
            if id(source) not in told_feeds:
                told_feeds[id(source)] = source.take_reset(source.position, reset_data(reset))
            if said := select(told_feeds[id(source)], ALL, view.skip):
                sub.push(said, end=True)
            else:
                sub.end()
        if told:
            self._metrics.resets.labels("deleted").inc(told)

    async def _presence_loop(self) -> None:
        # Tell workers which channels are watched, so abandoned generations can be stopped.
        # Were this loop to die, workers would cancel watched generations as unwatched: whatever fails, it goes on.
        assert self._presence is not None
        liveness = self._metrics.liveness
        while True:
            liveness.beat("presence")
            await asyncio.sleep(PRESENCE_INTERVAL_S)
            try:
                await self._presence.touch([name for name, ch in self._channels.items() if ch.subscribers])
            except BackendUnavailable as e:
                log.debug("presence report failed: %s", e)
            except Exception:
                log.exception("presence report failed; reporting again in %gs", PRESENCE_INTERVAL_S)

    async def _heartbeat_loop(self) -> None:
        # One timer for the whole node instead of one per connection; like the others, it outlives its own errors.
        liveness = self._metrics.liveness
        while True:
            liveness.beat("heartbeat")
            await asyncio.sleep(self._heartbeat_s)
            try:
                self._heartbeat()
            except Exception:
                log.exception("sending heartbeats failed; sending again in %gs", self._heartbeat_s)

    def _heartbeat(self) -> None:
        cut = 0
        for sub in tuple(self._subscribers):
            if not sub.push(_HEARTBEAT):
                cut += 1
                self.detach(sub)
        if cut:
            self._metrics.slow_disconnects.inc(cut)
