"""The backend contract: what a channel store must do, the ids it hands out, and the errors it raises.

Two implementations: `MemoryBackend` (embedded, one process) and `RedisBackend` (Redis Streams, any number of nodes).
One contract test suite runs against both. Nothing here imports aiohttp.web.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = [
    "DEFAULT_IDEMPOTENCY_WINDOW_S",
    "MAX_KEY",
    "AppendBatch",
    "Appended",
    "TRIM_SLACK_MAX",
    "ZERO_ID",
    "Backend",
    "BackendError",
    "ANY_OWNER",
    "AnyOwner",
    "BackendUnavailable",
    "ChannelClosed",
    "ChannelLost",
    "ChannelOwned",
    "ChannelRewound",
    "Fence",
    "Fenced",
    "ChannelInfo",
    "Idempotency",
    "IdempotencyConflict",
    "Entry",
    "InvalidPosition",
    "NotReplicated",
    "NewEvent",
    "RangeResult",
    "ReadResult",
    "Reset",
    "TailReader",
    "check_position",
    "format_id",
    "id_before",
    "parse_id",
]

ZERO_ID = "0-0"
# Trimming is approximate, like Redis `MAXLEN ~`: a channel keeps at least `history` entries and is trimmed only once
# the excess reaches min(TRIM_SLACK_MAX, history), so a busy channel is not trimmed on every append.
TRIM_SLACK_MAX = 100
# How long a publisher's Idempotency-Key is remembered. Retries after a timeout come within seconds or minutes; every
# key costs the store memory for the whole window, so it is not a day.
DEFAULT_IDEMPOTENCY_WINDOW_S = 600.0
_MAX_U64 = (1 << 64) - 1
MAX_KEY = (_MAX_U64, _MAX_U64)
_ID_RE = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")

StreamKey = tuple[int, int]


class AnyOwner(enum.Enum):
    """`Backend.delete(owner=ANY_OWNER)`: whoever owns the channel, if anyone."""

    ANY = "any"


ANY_OWNER: Literal[AnyOwner.ANY] = AnyOwner.ANY


class BackendError(Exception):
    """Base class of the errors a backend raises on purpose."""


class BackendUnavailable(BackendError):
    """The store cannot be reached or did not answer in time. Nothing was changed, or it is unknown (publish: 503)."""


class NotReplicated(BackendUnavailable):
    """The write is on the primary, but fewer replicas than required confirmed it in time (see `--publish-replicas`).
    It may survive a failover or not: a retry with the same idempotency key appends it at most once (publish: 503)."""

    def __init__(self, required: int, acked: int) -> None:
        super().__init__(f"{acked} of {required} replicas confirmed the write in time")
        self.required = required
        self.acked = acked


class ChannelRewound(BackendUnavailable):
    """A run's append found the channel's newest entry is not the run's last stored event (see Fence.after): the store
    lost events it had acknowledged (a failover to a replica that lacked them). Nothing was written; the run must not
    go on over the hole, and is re-run from a reset like after any store failure."""


class InvalidPosition(BackendError, ValueError):
    """A resume position that is not a stream id."""


class ChannelClosed(BackendError):
    """The channel was finished with `close`; it accepts no more events until it is deleted."""


class ChannelOwned(BackendError):
    """The channel belongs to a generation (see Backend.reserve): only its worker's fenced appends may write it."""


class ChannelLost(BackendError):
    """A generation's first append found its channel no longer its owner's (see Fence.channel_owner): the name was
    released after a submit that seemed to fail, deleted, or expired while the job waited. Nothing was written."""


class Fenced(BackendError):
    """Another writer holds the channel (see Fence): this one must stop writing."""


class IdempotencyConflict(BackendError):
    """The idempotency key was already used, within the window, for a request with other events."""


def parse_id(value: str) -> StreamKey:
    """Parse `<ms>-<seq>` (or `0`, meaning before the first entry) into a comparable key.

    Raises InvalidPosition for anything else, so a malformed `Last-Event-ID` is a 400, not a server error.
    """
    if value == "0":
        return (0, 0)
    m = _ID_RE.fullmatch(value)
    if m is None:
        raise InvalidPosition(f"not a stream id: {value[:64]!r}")
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms > _MAX_U64 or seq > _MAX_U64:
        raise InvalidPosition(f"stream id out of range: {value[:64]!r}")
    return (ms, seq)


def format_id(key: StreamKey) -> str:
    return f"{key[0]}-{key[1]}"


def id_before(value: str) -> str:
    """The greatest id smaller than `value`: `range(after=id_before(x))` starts exactly at x."""
    ms, seq = parse_id(value)
    if seq > 0:
        return format_id((ms, seq - 1))
    return format_id((ms - 1, _MAX_U64)) if ms > 0 else ZERO_ID


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its SSE event name and its data, already a string."""

    event: str
    data: str


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored event. `id` is the stream id, which is also the SSE `id:`; `close` marks the channel's last event.

    `prev` is the id of the entry appended just before it in the same stream ("0-0" for the first), so a reader can
    prove it missed nothing between two reads; None when unknown.
    """

    id: str
    event: str
    data: str
    close: bool = False
    prev: str | None = field(default=None, compare=False)
    key: StreamKey = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", parse_id(self.id))


@dataclass(frozen=True, slots=True)
class Fence:
    """Who may write a channel: one run (`attempt`) of one generation (`owner`).

    `take`: claim the channel for this run; refused if another owner holds it, or a later attempt of the same owner.
    Otherwise the append is refused unless this run holds it. A run that was taken over (its worker stalled, another
    re-ran the job) thus cannot write another token after the re-run began.

    `channel_owner` (with `take` only): the client the generation's channel was reserved for (see Backend.reserve).
    The take is refused with ChannelLost unless the channel's owner mark is still exactly that one, so that a run
    never writes, as an unowned channel anyone may read, a name whose reservation was undone or is gone. Checked on
    the take alone: the later appends of the run are held to the fence, which a delete removes with the owner.
    None: no check (a job queued by a hub that kept no owners).

    `after` (without `take`): the id of this run's last stored event. The append is refused with ChannelRewound
    unless it is still the channel's newest entry, so that a run whose latest events the store lost never writes on
    over the hole. None: no check.
    """

    owner: str
    attempt: int
    take: bool = False
    channel_owner: str | None = None
    after: str | None = None


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A publisher's key for one append, so that a retry (after a timeout, on any node) appends nothing twice.

    `fingerprint` digests the request's events: a key reused for other events is refused, never silently answered
    with the ids of something else. The store keeps each key for its idempotency window.
    """

    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Appended:
    """What an idempotent append did: the ids of its events, and whether they were appended by an earlier request
    with the same key (`replayed`: nothing was appended this time)."""

    ids: list[str]
    replayed: bool


@dataclass(frozen=True, slots=True)
class AppendBatch:
    """Events for one channel, appended atomically; with `close`, the last one ends the channel."""

    channel: str
    events: Sequence[NewEvent]
    close: bool = False
    fence: Fence | None = None


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    length: int
    first_id: str | None
    last_id: str
    closed: bool


@dataclass(frozen=True, slots=True)
class RangeResult:
    """History after a position, with what is needed to tell whether the position can still be honoured.

    `entries` are the entries with id > `after`, oldest first, at most `limit`; `more` says the limit cut them.
    The metadata is read atomically with the entries.
    """

    exists: bool
    entries: list[Entry]
    more: bool
    first_id: str | None  # oldest retained entry
    last_id: str  # last id ever generated in this stream (ZERO_ID when none)
    max_deleted_id: str  # newest id removed by trimming (ZERO_ID when none)
    closed: bool  # the newest entry carries the close flag


@dataclass(frozen=True, slots=True)
class Reset:
    """Why a position cannot be honoured exactly, and the position the stream continues after instead."""

    reason: str  # "trimmed" | "expired" | "unknown_position" | "deleted"
    continue_after: str
    requested: str


def check_position(after: str, r: RangeResult) -> Reset | None:
    """Decide whether resuming after `after` would silently skip events; if so, say why and where to continue.

    Every entry a stream ever held is either still retained (id >= first_id) or was trimmed (id <= max_deleted_id).
    So: a trimmed id newer than the position means a gap; a position newer than anything generated, or one that falls
    between what was trimmed and what is retained, was never an entry of this stream (it was recreated after expiry,
    deletion or a Redis data loss) and its gap cannot be ruled out.

    Each entry also names the one appended before it (`Entry.prev`). When the first entry after the position names
    another, the position is not an entry of the stream as the store holds it now: the store came back without its
    latest writes (a restart without persistence, a failover to a lagging replica) and new ones followed. Whatever the
    client was missing went with them; it is told so rather than carried over the hole.
    """
    pos = parse_id(after)
    if pos == (0, 0):
        if r.exists and parse_id(r.max_deleted_id) > pos:
            return Reset("trimmed", r.max_deleted_id, after)
        return None
    if not r.exists:
        return Reset("expired", ZERO_ID, after)
    max_deleted = parse_id(r.max_deleted_id)
    if pos > parse_id(r.last_id):
        return Reset("unknown_position", r.max_deleted_id, after)
    if max_deleted > pos:
        return Reset("trimmed", r.max_deleted_id, after)
    if r.first_id is not None and pos < parse_id(r.first_id) and pos != max_deleted:
        return Reset("unknown_position", r.max_deleted_id, after)
    if r.entries and (prev := r.entries[0].prev) is not None and parse_id(prev) != pos:
        return Reset("unknown_position", r.max_deleted_id, after)
    return None


@dataclass(slots=True)
class ReadResult:
    """What one live-tail read returned: new entries per channel, channels deleted since the last read, and channels
    found gone without a deletion notice (a reader that learns of deletions by polling cannot tell deleted from
    expired or lost: their streams resume, and the store says which)."""

    entries: dict[str, list[Entry]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)


class TailReader(Protocol):
    """A node's single live-tail cursor over many channels. Only `Fanout` uses it."""

    async def read(self, positions: Mapping[str, str], *, block_s: float) -> ReadResult:
        """Entries with id > positions[channel], for every channel given, oldest first per channel.

        Blocks up to `block_s` while there is nothing; returns early on new entries, on a deletion, or when
        `interrupt()` is called (then possibly empty). Never skips entries: the caller passes the last id it received,
        never "latest". Raises BackendUnavailable when the store is unreachable; a later call may succeed.
        A channel left out is no longer followed: the reader lets go of what it held for it (on Redis, its
        subscription and any rings kept), so a read of no channels with `block_s=0` releases everything.
        """
        ...

    async def interrupt(self) -> None:
        """Make a `read()` in progress (or about to start) return soon, so a changed channel set takes effect."""
        ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    """A store of channels, each an append-only, trimmed, expiring sequence of events with strictly increasing ids.

    Ids are `<ms>-<seq>` strings (Redis stream ids), strictly increasing per channel; their ms part is the append time.
    All methods raise BackendUnavailable when the store is unreachable, within a bounded time, never hanging.
    """

    async def append(self, channel: str, events: Sequence[NewEvent], *, close: bool = False) -> list[str]:
        """Append `events` in order, atomically (all or none), and return their ids.

        With `close`, the last event carries the close flag and the channel accepts nothing more. Trims the channel to
        about `history` entries and refreshes its expiry. Raises ChannelClosed if the channel was already closed, and
        ChannelOwned if it belongs to a generation (only fenced appends, `append_many`, may write those). Where the
        store requires replicas to hold each write (Redis with `--publish-replicas`), raises NotReplicated when they did
        not confirm it in time: the events are stored on the primary, not yet safe from its loss.
        """
        ...

    async def append_once(
        self, channel: str, events: Sequence[NewEvent], idempotency: Idempotency, *, close: bool = False
    ) -> Appended:
        """`append`, unless an append with the same key was made within the idempotency window: then nothing is
        appended and its ids are answered again. Checked and done atomically, so two concurrent requests with one key
        append once. Raises IdempotencyConflict if the key was used for other events; ChannelClosed as `append`
        (after the key check, so the retry of a request that closed the channel gets its ids)."""
        ...

    async def append_many(self, batches: Sequence[AppendBatch]) -> list[list[str] | BackendError]:
        """Several appends (to different channels, or in order to the same one) in one round trip.

        Each batch is applied as by `append`, in the order given; the result for each is its ids, or the BackendError
        that refused it (ChannelClosed, ChannelOwned for a batch without a fence, Fenced, ChannelLost for a take
        whose `channel_owner` does not hold the channel, BackendUnavailable). Used by producers to coalesce tokens.
        """
        ...

    async def reserve(self, channel: str, owner: str) -> bool:
        """Make `channel` a generation's channel, owned by `owner`, if it does not exist (no stream, no owner).

        Checked and done atomically. From then on every append without a fence is refused (ChannelOwned), so only the
        generation's worker writes it, from the first event on; the mark lives as long as the channel (its TTL,
        refreshed by appends) and goes with the `delete` of its stream. Nothing is announced to tail readers: a stream
        opened on the name before has its right to it checked when the first entries come (see hub.fanout).
        False (nothing changed) when the channel exists.
        """
        ...

    async def release(self, channel: str, owner: str) -> bool:
        """Undo a `reserve` whose job was never queued: remove the owner mark if it is still `owner`'s and nothing has
        been written to the channel, atomically. False (nothing changed) otherwise: a channel its worker has begun to
        write stays its owner's."""
        ...

    async def owner(self, channel: str) -> str | None:
        """Who owns `channel` (see `reserve`), or None: not a generation's channel."""
        ...

    async def range(self, channel: str, after: str, *, limit: int) -> RangeResult:
        """History after `after` (exclusive) plus the channel's metadata, read atomically. See RangeResult."""
        ...

    async def info(self, channel: str) -> ChannelInfo | None:
        """The channel's length and ends, or None when it does not exist."""
        ...

    async def delete(self, channel: str, *, owner: str | None | AnyOwner = ANY_OWNER) -> bool:
        """Remove the channel and its owner; live tail readers on every node report it in `ReadResult.deleted`.
        False if absent: a generation's channel reserved but not yet written is absent, and keeps its owner (its
        queued job will write it).

        `owner`: delete only if the channel's owner mark (see `reserve`) is this one (None: it has none), checked
        atomically with the deletion; else False, as for an absent channel. A caller authorized against the owner it
        read cannot so delete a generation that took the name after the read.
        """
        ...

    async def open_reader(self) -> TailReader:
        """A new live-tail cursor (the Redis one holds its own connection).

        Deletions are reported from this call on. If the store is unreachable now, from the first successful read.
        """
        ...

    async def ping(self) -> None:
        """Raise BackendUnavailable unless the store answers now (readiness)."""
        ...

    async def aclose(self) -> None: ...
