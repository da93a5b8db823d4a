"""Streams in another API's format share one encoder per channel and format on a node (hub.transcode): each event is
encoded once whatever the number of streams, a stream that caught up ahead of or behind the live tail gets each unit
exactly once, a late stream is served from the feed's memory from any unit on, and a stream ended early gets the
ending that matches what it was written."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from hub.fanout import Fanout, Subscriber, reset_data
from hub.metrics import HubMetrics
from hub.transcode import Transcoding
from ssecore.backend import Entry, Reset
from ssecore.backend_memory import MemoryBackend


class Units:
    """A format whose units name the event they come from; a `pair` event makes two. Counts what it encodes."""

    encoded: list[str] = []

    def __init__(self) -> None:
        self.over = False
        self.seen = 0

    def encode(self, kind: str, data: str) -> list[bytes]:
        Units.encoded.append(data)
        self.seen += 1
        if kind == "done":
            self.over = True
        unit = f"[{data}]".encode()
        return [unit, unit.upper()] if kind == "pair" else [unit]

    def cut(self) -> bytes:
        return b"" if self.over else f"<cut after {self.seen}>".encode()


def _entries(*kinds: str) -> Iterator[Entry]:
    prev = "0-0"
    for i, kind in enumerate(kinds, 1):
        yield Entry(f"{i}-0", kind, f"e{i}", close=kind == "done", prev=prev)
        prev = f"{i}-0"


def _fanout() -> Fanout:
    # Never started: no live tail runs, and each test hands the fan-out its batches itself.
    metrics = HubMetrics(CollectorRegistry())
    return Fanout(MemoryBackend(history=100, ttl_s=60), metrics, block_s=1.0, heartbeat_s=30.0, window_bytes=1 << 20)


def _stream(fanout: Fanout, caught_up: list[Entry], skip: int = 0) -> tuple[Subscriber, bytes]:
    """A stream that replayed `caught_up` into its own encoder and joins: (it, what its catch-up wrote)."""
    sub = Subscriber("c", None, 1 << 20)
    feed = fanout.feed(sub, Transcoding(Units(), "k", skip))
    written = b"".join(u for _, first, units in feed.take(caught_up) for i, u in enumerate(units, first) if i >= skip)
    assert fanout.try_attach(sub, caught_up[-1].id if caught_up else "0", feed=feed)
    return sub, written


def test_each_event_is_encoded_once_and_each_stream_gets_each_unit_once() -> None:
    fanout = _fanout()
    e = list(_entries("token", "pair", "token", "token", "pair", "done"))
    native = Subscriber("c", None, 1 << 20)
    assert fanout.try_attach(native, "0")  # the tail stands at the channel's start
    ahead, ahead_wrote = _stream(fanout, e[:3])  # caught up past the tail from the store
    behind, behind_wrote = _stream(fanout, e[:1])  # caught up less far: its encoder is the one the feed goes on with
    Units.encoded = []
    fanout._dispatch("c", fanout._channels["c"], e[:5])
    # e1 is the tail's first entry too: nobody needs it again, and e2..e5 are each encoded once for both streams.
    assert Units.encoded == ["e2", "e3", "e4", "e5"]
    assert ahead_wrote + (ahead.take_pending() or b"") == b"[e1][e2][E2][e3][e4][e5][E5]"
    assert behind_wrote + (behind.take_pending() or b"") == b"[e1][e2][E2][e3][e4][e5][E5]"
    assert native.take_pending() == b"".join(
        f"id: {x.id}\nevent: {x.event}\ndata: {x.data}\n\n".encode() for x in e[:5]
    )

    # A stream that comes now is served from the feed's memory, from its fourth unit on, replaying nothing.
    late = Subscriber("c", None, 1 << 20)
    fanout.feed(late, Transcoding(Units(), "k", skip=3))
    assert fanout.resume_feed(late, "k")
    assert Units.encoded == ["e2", "e3", "e4", "e5"]
    fanout._dispatch("c", fanout._channels["c"], e[5:])
    assert late.take_pending() == b"[e3][e4][e5][E5][e6]"
    assert Units.encoded == ["e2", "e3", "e4", "e5", "e6"]
    assert ahead.ended and behind.ended and late.ended and _ending(ahead) == b""


def test_a_stream_ended_early_gets_the_ending_of_what_it_was_written() -> None:
    fanout = _fanout()
    e = list(_entries("token", "token", "token", "done"))
    first, _ = _stream(fanout, e[:1])
    second, _ = _stream(fanout, e[:1])
    fanout._dispatch("c", fanout._channels["c"], e[1:2])
    first.end()  # the node drains, or its token expired
    fanout.detach(first)
    fanout._dispatch("c", fanout._channels["c"], e[2:])
    assert first.take_pending() == b"[e2]" and _ending(first) == b"<cut after 2>"
    assert second.take_pending() == b"[e2][e3][e4]" and _ending(second) == b""


def test_a_stream_ahead_of_the_feed_ends_and_is_told_of_a_deletion_from_where_it_is() -> None:
    fanout = _fanout()
    e = list(_entries("token", "token", "token", "token"))
    behind, _ = _stream(fanout, e[:1])
    ahead, _ = _stream(fanout, e[:3])  # past the feed, which the live tail has not moved on yet
    ahead.end()
    assert _ending(ahead) == b"<cut after 3>"  # what it was written, not where the shared feed stands (1)
    fanout._on_deleted("c")
    told = reset_data(Reset("deleted", "0-0", "1-0")).encode()
    assert behind.take_pending() == b"[" + told + b"]" and behind.ended


def test_a_stream_whose_catch_up_met_a_reset_reads_its_own_encoder() -> None:
    fanout = _fanout()
    e = list(_entries("token", "token", "token", "token"))
    first, _ = _stream(fanout, e[:2])
    trimmed = Subscriber("c", None, 1 << 20)
    own = fanout.feed(trimmed, Transcoding(Units(), "k"))
    wrote = b"".join(u for _, _, units in own.take_reset((1, 0), '"trimmed"') for u in units)
    wrote += b"".join(u for _, _, units in own.take(e[1:2]) for u in units)
    assert fanout.try_attach(trimmed, e[1].id, feed=own)
    fanout._dispatch("c", fanout._channels["c"], e[2:])
    assert first.take_pending() == b"[e3][e4]"
    assert wrote + (trimmed.take_pending() or b"") == b'["trimmed"][e2][e3][e4]'
    assert fanout._channels["c"].feeds["k"].subscribers == {first}


def _ending(sub: Subscriber) -> bytes | None:
    assert sub.view is not None
    return sub.view.ending


def test_a_streams_own_encoder_goes_when_it_does() -> None:
    fanout = _fanout()
    sub = Subscriber("c", None, 1 << 20)
    feed = fanout.feed(sub, Transcoding(Units()))  # no key: read by this stream alone (a whole answer built)
    assert fanout.try_attach(sub, "0", feed=feed)
    assert not fanout.has_feed("c", None)
    fanout.detach(sub)
    assert fanout._channels["c"].feeds == {}
