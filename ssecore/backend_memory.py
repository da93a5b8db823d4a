"""MemoryBackend: channels kept in this process, with the same ids, trimming, expiry, close and reset as Redis.

The embedded backend for development and single-node use. It is product code with its own contract tests.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .backend import (
    ANY_OWNER,
    DEFAULT_IDEMPOTENCY_WINDOW_S,
    TRIM_SLACK_MAX,
    ZERO_ID,
    AnyOwner,
    AppendBatch,
    Appended,
    BackendError,
    ChannelClosed,
    ChannelInfo,
    ChannelLost,
    ChannelOwned,
    ChannelRewound,
    Entry,
    Fence,
    Fenced,
    Idempotency,
    IdempotencyConflict,
    NewEvent,
    RangeResult,
    ReadResult,
    StreamKey,
    format_id,
    parse_id,
)

__all__ = ["MemoryBackend"]

_SWEEP_INTERVAL_S = 1.0
_MAX_PENDING_DELETIONS = 10_000


@dataclass(slots=True)
class _Channel:
    entries: list[Entry] = field(default_factory=list)
    keys: list[StreamKey] = field(default_factory=list)
    last: StreamKey = (0, 0)
    max_deleted: StreamKey = (0, 0)
    expires_at: float = 0.0
    fence: tuple[str, int] | None = None  # (owner, attempt) of the run allowed to write

    @property
    def closed(self) -> bool:
        return bool(self.entries) and self.entries[-1].close


class MemoryBackend:
    def __init__(
        self,
        *,
        history: int,
        ttl_s: float,
        idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._history = history
        self._ttl_s = ttl_s
        self._idempotency_window_s = idempotency_window_s
        self._clock = clock
        self._channels: dict[str, _Channel] = {}
        # (channel, key) → (fingerprint, ids, expiry). One window for all: insertion order is expiry order.
        self._idempotent: dict[tuple[str, str], tuple[str, list[str], float]] = {}
        # channel → (owner, expiry) of generations' channels; apart from the channels, as Redis keeps them: a reserved
        # channel does not exist until its worker's first append.
        self._owners: dict[str, tuple[str, float]] = {}
        self._readers: set[_MemoryTailReader] = set()
        self._changed = asyncio.Event()
        self._last_sweep = 0.0

    # -- helpers ------------------------------------------------------------------------------------------------------

    def _get(self, channel: str, now: float) -> _Channel | None:
        ch = self._channels.get(channel)
        if ch is not None and ch.expires_at <= now:
            del self._channels[channel]
            return None
        return ch

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < _SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        for name in [n for n, ch in self._channels.items() if ch.expires_at <= now]:
            del self._channels[name]
        for name in [n for n, (_, expires_at) in self._owners.items() if expires_at <= now]:
            del self._owners[name]
        for key, (_, _, expires_at) in list(self._idempotent.items()):
            if expires_at > now:
                break
            del self._idempotent[key]

    def _owner(self, channel: str, now: float) -> str | None:
        held = self._owners.get(channel)
        if held is None:
            return None
        if held[1] <= now:
            del self._owners[channel]
            return None
        return held[0]

    def _next_id(self, ch: _Channel, now: float) -> StreamKey:
        ms = int(now * 1000)
        return (ms, 0) if ms > ch.last[0] else (ch.last[0], ch.last[1] + 1)

    def _trim(self, ch: _Channel) -> None:
        excess = len(ch.entries) - self._history
        if excess >= min(TRIM_SLACK_MAX, max(1, self._history)):
            ch.max_deleted = ch.keys[excess - 1]
            del ch.entries[:excess]
            del ch.keys[:excess]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- Backend ------------------------------------------------------------------------------------------------------

    async def append(self, channel: str, events: Sequence[NewEvent], *, close: bool = False) -> list[str]:
        return self._append(channel, events, close, None)

    async def append_once(
        self, channel: str, events: Sequence[NewEvent], idempotency: Idempotency, *, close: bool = False
    ) -> Appended:
        now = self._clock()
        self._sweep(now)
        if self._owner(channel, now) is not None:
            raise ChannelOwned(channel)
        slot = (channel, idempotency.key)
        seen = self._idempotent.get(slot)
        if seen is not None and seen[2] > now:
            if seen[0] != idempotency.fingerprint:
                raise IdempotencyConflict(channel)
            return Appended(list(seen[1]), True)
        ids = self._append(channel, events, close, None)
        self._idempotent.pop(slot, None)  # re-inserted last, keeping insertion order the expiry order
        self._idempotent[slot] = (idempotency.fingerprint, ids, now + self._idempotency_window_s)
        return Appended(ids, False)

    def _append(self, channel: str, events: Sequence[NewEvent], close: bool, fence: Fence | None) -> list[str]:
        now = self._clock()
        self._sweep(now)
        owner = self._owner(channel, now)
        if owner is not None and fence is None:
            raise ChannelOwned(channel)
        ch = self._get(channel, now)
        if ch is not None and ch.closed:
            raise ChannelClosed(channel)
        if fence is not None and fence.take and fence.channel_owner is not None and owner != fence.channel_owner:
            raise ChannelLost(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel()
        if fence is not None:
            held = ch.fence
            if fence.take:
                if held is not None and (held[0] != fence.owner or held[1] > fence.attempt):
                    raise Fenced(channel)
                ch.fence = (fence.owner, fence.attempt)
            elif held != (fence.owner, fence.attempt):
                raise Fenced(channel)
            elif fence.after is not None and (not ch.entries or ch.entries[-1].id != fence.after):
                raise ChannelRewound(channel)
        ids: list[str] = []
        last_index = len(events) - 1
        for i, ev in enumerate(events):
            key = self._next_id(ch, now)
            entry = Entry(format_id(key), ev.event, ev.data, close and i == last_index, format_id(ch.last))
            ch.entries.append(entry)
            ch.keys.append(key)
            ch.last = key
            ids.append(entry.id)
        self._trim(ch)
        ch.expires_at = now + self._ttl_s
        if owner is not None:
            self._owners[channel] = (owner, ch.expires_at)
        self._notify()
        return ids

    async def append_many(self, batches: Sequence[AppendBatch]) -> list[list[str] | BackendError]:
        results: list[list[str] | BackendError] = []
        for b in batches:
            try:
                results.append(self._append(b.channel, b.events, b.close, b.fence))
            except BackendError as e:
                results.append(e)
        return results

    async def range(self, channel: str, after: str, *, limit: int) -> RangeResult:
        pos = parse_id(after)
        ch = self._get(channel, self._clock())
        if ch is None:
            return RangeResult(False, [], False, None, ZERO_ID, ZERO_ID, False)
        start = bisect.bisect_right(ch.keys, pos)
        entries = ch.entries[start : start + limit]
        return RangeResult(
            exists=True,
            entries=entries,
            more=len(ch.entries) - start > limit,
            first_id=ch.entries[0].id if ch.entries else None,
            last_id=format_id(ch.last),
            max_deleted_id=format_id(ch.max_deleted),
            closed=ch.closed,
        )

    async def info(self, channel: str) -> ChannelInfo | None:
        ch = self._get(channel, self._clock())
        if ch is None:
            return None
        first = ch.entries[0].id if ch.entries else None
        return ChannelInfo(length=len(ch.entries), first_id=first, last_id=format_id(ch.last), closed=ch.closed)

    async def delete(self, channel: str, *, owner: str | None | AnyOwner = ANY_OWNER) -> bool:
        now = self._clock()
        ch = self._get(channel, now)
        if ch is None:
            return False  # a reserved name keeps its owner: its queued job still writes it
        if owner is not ANY_OWNER and self._owner(channel, now) != owner:
            return False
        del self._channels[channel]
        self._owners.pop(channel, None)
        for reader in self._readers:
            reader.note_deleted(channel)
        self._notify()
        return True

    async def reserve(self, channel: str, owner: str) -> bool:
        now = self._clock()
        if self._get(channel, now) is not None or self._owner(channel, now) is not None:
            return False
        self._owners[channel] = (owner, now + self._ttl_s)
        return True

    async def release(self, channel: str, owner: str) -> bool:
        now = self._clock()
        if self._get(channel, now) is not None or self._owner(channel, now) != owner:
            return False
        del self._owners[channel]
        return True

    async def owner(self, channel: str) -> str | None:
        return self._owner(channel, self._clock())

    async def open_reader(self) -> _MemoryTailReader:
        reader = _MemoryTailReader(self)
        self._readers.add(reader)
        return reader

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._notify()

    # -- for the reader -----------------------------------------------------------------------------------------------

    def _collect(self, positions: Mapping[str, str]) -> dict[str, list[Entry]]:
        now = self._clock()
        out: dict[str, list[Entry]] = {}
        for name, pos in positions.items():
            ch = self._get(name, now)
            if ch is None or not ch.keys or ch.keys[-1] <= (key := parse_id(pos)):
                continue
            out[name] = ch.entries[bisect.bisect_right(ch.keys, key) :]
        return out


class _MemoryTailReader:
    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend
        self._interrupted = False
        self._wake = asyncio.Event()
        self.deleted: list[str] = []
        self.positions: Mapping[str, str] = {}  # what the last read was given: the channels tailed

    def note_deleted(self, channel: str) -> None:
        # Bounded: a reader that is not being read (a node with no active channels) must not grow without end.
        # A notice dropped here is not a silent gap: the reader's continuity check (Entry.prev) catches a recreation.
        if len(self.deleted) < _MAX_PENDING_DELETIONS and channel not in self.deleted[-16:]:
            self.deleted.append(channel)

    async def read(self, positions: Mapping[str, str], *, block_s: float) -> ReadResult:
        self.positions = positions
        deadline = time.monotonic() + block_s
        while True:
            changed = self._backend._changed
            entries = self._backend._collect(positions)
            if entries or self.deleted or self._interrupted:
                deleted, self.deleted = self.deleted, []
                self._interrupted = False
                return ReadResult(entries, deleted)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ReadResult()
            self._wake = asyncio.Event()
            waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    async def interrupt(self) -> None:
        self._interrupted = True
        self._wake.set()

    async def aclose(self) -> None:
        self._backend._readers.discard(self)
        await self.interrupt()
