"""Another API's stream format over a channel (hub.chat_completions, hub.responses_api, hub.ai_sdk), encoded once per
format per node, not once per stream.

An `Encoder` turns the channel's events, from its start, into the format's units (a Responses event, a UI message
chunk): a function of the events alone, so that two encoders fed the same events are in the same state. A `Feed` is
one encoder over one channel on this node: the fan-out (hub.fanout) gives it each batch once and hands every stream in
that format the same bytes. A stream that joins does not replay the channel into an encoder of its own when the feed
still keeps every unit it made (up to the resume window's bytes): it is served from memory, from any unit on.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ssecore.backend import Entry, StreamKey

if TYPE_CHECKING:
    from .fanout import Subscriber

__all__ = ["ALL", "Batch", "Encoder", "Feed", "Transcoding", "View", "encode_safely", "select"]

log = logging.getLogger(__name__)

_UNREADABLE = '{"code":"unreadable","message":"the channel holds an event this format cannot read"}'


class Encoder(Protocol):
    def encode(self, kind: str, data: str) -> list[bytes]:
        """The units (the format's events or chunks, each counted) one channel event makes; [] for none."""
        ...

    def cut(self) -> bytes:
        """What ends the stream in this format when it ends before the channel did (the token expired, the node is
        draining): those clients do not reconnect by themselves, so it must say so rather than stop. b"" once the
        channel's answer has ended. Changes nothing: the encoder may go on for other streams."""
        ...


@dataclass(slots=True)
class Transcoding:
    """How a stream wants the channel: `encoder`, fresh (it has seen no event); `key`, what its output depends on
    besides the channel (streams whose keys are equal share one encoder; None: this stream's own, as when the caller
    reads the encoder's state at the end); `skip`, how many units the client already has."""

    encoder: Encoder
    key: Hashable | None = None
    skip: int = 0


# The units one batch made: (entry key, index of its first unit, its units) for each entry.
Batch = list[tuple[StreamKey, int, list[bytes]]]
ALL: StreamKey = (-1, -1)  # before every entry: `select` what a batch made, whatever its entries' ids
_ENTRY_BYTES = 100  # what `kept` holds per entry besides its units' bytes, counted against the cap


def encode_safely(encoder: Encoder, kind: str, data: str) -> list[bytes]:
    """An event in the encoder's format. One it cannot read ends the answer as an error, the same way wherever it is
    encoded: a feed that raised would raise again on the same entries, and the fan-out's one task must go on."""
    try:
        return encoder.encode(kind, data)
    except Exception as exc:
        log.warning("cannot re-encode a %r event: %r", kind, exc)
    try:
        return encoder.encode("error", _UNREADABLE)
    except Exception:
        log.exception("cannot encode the error ending an unreadable event")
        return []


def select(batch: Batch, after: StreamKey, skip: int) -> bytes:
    """The bytes of `batch` for a stream that has every entry up to `after` and wants units from index `skip` on."""
    parts: list[bytes] = []
    for key, first, units in batch:
        if key <= after or first + len(units) <= skip:
            continue
        parts.extend(units if first >= skip else units[skip - first :])
    return b"".join(parts)


class Feed:
    """One encoder over one channel, with the streams that read it. `position` is the last entry the encoder took,
    `units` how many units it has made; `kept`, while it holds every unit from the channel's start within `cap`
    bytes, what a stream joining later is served from (None once it would not, or when nobody could join)."""

    __slots__ = (
        "_ending",
        "cap",
        "encoder",
        "key",
        "kept",
        "kept_bytes",
        "position",
        "reset",
        "subscribers",
        "units",
    )

    def __init__(self, encoder: Encoder, key: Hashable, cap: int) -> None:
        self.encoder = encoder
        self.key = key
        self.cap = cap
        self.position: StreamKey = (0, 0)
        self.units = 0
        self.kept: Batch | None = [] if cap > 0 else None
        self.kept_bytes = 0
        # It took a `reset` its catch-up met (the channel's start trimmed away): its events are not the channel's
        # own any more, and no other stream may read it (see View).
        self.reset = False
        self.subscribers: set[Subscriber] = set()
        self._ending: tuple[int, bytes] | None = None  # the encoder's cut, and at how many units it was taken

    def take(self, entries: Iterable[Entry]) -> Batch:
        """Encode the entries after `position`."""
        batch: Batch = []
        for e in entries:
            if e.key <= self.position:
                continue  # taken already: this feed was made by a stream that caught up ahead of the live tail
            self.add(batch, e.key, encode_safely(self.encoder, e.event, e.data))
        self._keep(batch)
        return batch

    def take_reset(self, key: StreamKey, data: str) -> Batch:
        """The in-band `reset` a catch-up met (the channel's start was trimmed away), at `key`."""
        self.reset = True
        self.private()
        batch: Batch = []
        self.add(batch, max(key, self.position), encode_safely(self.encoder, "reset", data))
        return batch

    def private(self) -> None:
        """Nobody else will read it: it keeps nothing for them."""
        self.cap, self.kept, self.kept_bytes = 0, None, 0

    def ending(self) -> bytes:
        """The encoder's cut, taken once per state: a drain ends every stream of a feed at once."""
        if self._ending is None or self._ending[0] != self.units:
            self._ending = self.units, self.encoder.cut()
        return self._ending[1]

    def add(self, batch: Batch, key: StreamKey, units: list[bytes]) -> None:
        batch.append((key, self.units, units))
        self.units += len(units)
        self.position = key

    def _keep(self, batch: Batch) -> None:
        if self.kept is None or not batch:
            return
        self.kept.extend(batch)
        self.kept_bytes += sum(_ENTRY_BYTES + sum(len(u) for u in units) for _, _, units in batch)
        if self.kept_bytes > self.cap:
            self.kept = None  # not whole any more: a stream joining later replays the store

    def adopt(self, other: Feed) -> None:
        """Take the state of a feed that is behind this one (a stream caught up to an earlier entry): the entries in
        between are encoded again, to the same units, and the streams that already have them skip them."""
        self.encoder, self.position, self.units = other.encoder, other.position, other.units
        self.kept, self.kept_bytes, self._ending = other.kept, other.kept_bytes, None


class View:
    """How one stream reads the channel in another format: `own`, the feed its catch-up fed; `shared`, the channel's
    feed it joined (None until then); `skip`, how many units the client already has; `ending`, what it ends with,
    taken from the feed when it was ended (later events move the feed on)."""

    __slots__ = ("ending", "own", "shared", "skip")

    def __init__(self, own: Feed, skip: int) -> None:
        self.own = own
        self.shared: Feed | None = None
        self.skip = skip
        self.ending: bytes | None = None

    def source(self, last_key: StreamKey) -> Feed:
        """The feed whose state is what this stream was written, for a stream that has the entries up to `last_key`:
        the shared one, unless the stream caught up past it (then its own encoder stopped where the stream is)."""
        shared = self.shared
        return shared if shared is not None and last_key <= shared.position else self.own
