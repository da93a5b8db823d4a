"""Accounting: the exact delivery record of each subscriber (gaps, duplicates, order), exact percentiles, and the
counters a worker reports to the parent every second.

Everything here is plain data that pickles, so workers can send it over their pipe and the parent can merge it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction

__all__ = ["Histogram", "SequenceTracker", "StreamTotals", "Tick"]


@dataclass(slots=True)
class Histogram:
    """Counts of integer samples (latencies in whole microseconds).

    Percentiles are exact (nearest rank over every sample) at the samples' resolution; the counts merge by addition,
    so workers send them instead of every sample, and a microsecond is below what the clocks can tell apart anyway.
    """

    counts: dict[int, int] = field(default_factory=dict)

    def add(self, value: int) -> None:
        counts = self.counts
        counts[value] = counts.get(value, 0) + 1

    def extend(self, values: Iterable[int]) -> None:
        for v in values:
            self.add(v)

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for value, n in other.counts.items():
            counts[value] = counts.get(value, 0) + n

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return bool(self.counts)

    def min(self) -> int:
        return min(self.counts)

    def max(self) -> int:
        return max(self.counts)

    def mean(self) -> float:
        return sum(v * n for v, n in self.counts.items()) / self.count

    def percentile(self, q: float) -> int:
        return self.percentiles([q])[0]

    def percentiles(self, qs: Sequence[float]) -> list[int]:
        """Nearest-rank percentiles: the smallest sample with at least q% of all samples at or below it.

        `q` is taken as the decimal it is written as (99.9 is 999/10, not the nearest binary fraction), so the rank
        `ceil(q/100 * n)` is exact. Raises ValueError on an empty histogram or q outside (0, 100].
        """
        n = self.count
        if n == 0:
            raise ValueError("no samples")
        ranks: list[int] = []
        for q in qs:
            frac = Fraction(str(q))
            if not 0 < frac <= 100:
                raise ValueError(f"percentile {q} is not in (0, 100]")
            ranks.append(max(1, math.ceil(frac * n / 100)))
        order = sorted(range(len(ranks)), key=ranks.__getitem__)
        out = [0] * len(ranks)
        seen = 0
        i = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            while i < len(order) and ranks[order[i]] <= seen:
                out[order[i]] = value
                i += 1
            if i == len(order):
                break
        return out


@dataclass(slots=True)
class SequenceTracker:
    """The delivery record of one subscriber on one channel, whose events carry the sequence numbers 0, 1, 2, …

    An event below the highest seen so far is either a late one (it filled a hole: out of order) or a duplicate.
    """

    next: int = 0  # one past the highest sequence number seen
    received: int = 0  # events seen, duplicates included
    duplicates: int = 0
    out_of_order: int = 0
    holes: set[int] = field(default_factory=set)  # sequence numbers below `next` not seen (yet)

    def see(self, seq: int) -> None:
        self.received += 1
        nxt = self.next
        if seq == nxt:
            self.next = nxt + 1
        elif seq > nxt:
            self.holes.update(range(nxt, seq))
            self.next = seq + 1
        elif seq in self.holes:
            self.holes.discard(seq)
            self.out_of_order += 1
        else:
            self.duplicates += 1

    def complete(self, expected: int) -> bool:
        """Whether every one of the `expected` events (0 … expected-1) has arrived."""
        return self.next >= expected and not self.holes

    def missing(self, expected: int) -> list[int]:
        """The sequence numbers below `expected` that never arrived, in order."""
        return sorted(h for h in self.holes if h < expected) + list(range(self.next, expected))

    def gaps(self, expected: int) -> int:
        """Runs of consecutive missing sequence numbers: one lost stretch of events counts as one gap."""
        runs = 0
        prev = -2
        for seq in self.missing(expected):
            if seq != prev + 1:
                runs += 1
            prev = seq
        return runs

    def beyond(self, expected: int) -> int:
        """Distinct sequence numbers seen at or past `expected`: events nobody published (or counted)."""
        return max(0, self.next - expected) - sum(1 for h in self.holes if h >= expected)


@dataclass(slots=True)
class StreamTotals:
    """The delivery records of many subscribers, summed. A healthy run has missing, gaps, duplicates, out_of_order,
    beyond, unexpected, resets and dropped all 0, and delivered == expected."""

    subscribers: int = 0  # streams that opened and were accounted
    complete: int = 0  # of those, streams that received every expected event
    expected: int = 0  # events the subscribers should have received (published on their channels)
    delivered: int = 0  # events received with a valid sequence number, duplicates included
    missing: int = 0  # expected events never received
    gaps: int = 0  # runs of consecutive missing events
    duplicates: int = 0
    out_of_order: int = 0
    beyond: int = 0  # sequence numbers past what was published
    unexpected: int = 0  # events of another name, or whose data is not ours
    resets: int = 0  # `reset` events from the hub
    dropped: int = 0  # streams the server ended (or that broke) before the run did

    def add(self, tracker: SequenceTracker, expected: int) -> None:
        missing = tracker.missing(expected)
        self.subscribers += 1
        self.complete += 1 if not missing else 0
        self.expected += expected
        self.delivered += tracker.received
        self.missing += len(missing)
        self.gaps += tracker.gaps(expected)
        self.duplicates += tracker.duplicates
        self.out_of_order += tracker.out_of_order
        self.beyond += tracker.beyond(expected)

    def merge(self, other: StreamTotals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def problems(self) -> list[str]:
        """What went wrong, in words; empty for a clean run."""
        out = [
            f"{getattr(self, name)} {label}"
            for name, label in (
                ("missing", "events missing"),
                ("gaps", "gaps"),
                ("duplicates", "duplicates"),
                ("out_of_order", "events out of order"),
                ("beyond", "events beyond those published"),
                ("unexpected", "unexpected events"),
                ("resets", "resets"),
                ("dropped", "streams dropped"),
            )
            if getattr(self, name)
        ]
        if self.delivered != self.expected:
            out.append(f"{self.delivered} deliveries where {self.expected} were expected")
        return out


@dataclass(slots=True)
class Tick:
    """What one worker did since its previous tick (counters are deltas; `open` is the current count)."""

    open: int = 0  # connections open now
    opened: int = 0  # connections that got their stream going
    failed: int = 0  # connection attempts that did not
    dropped: int = 0  # open streams that ended before the run did
    delivered: int = 0  # events received by subscribers
    published: int = 0  # events the server accepted
    requests: int = 0  # publish requests that succeeded
    publish_errors: int = 0  # publish requests that failed
    errors: dict[str, int] = field(default_factory=dict)  # failures by reason (http_503, refused, timeout, …)
    latency_us: Histogram = field(default_factory=Histogram)  # publish → receipt, per delivered event
    connect_us: Histogram = field(default_factory=Histogram)  # connection start → stream ready
    request_us: Histogram = field(default_factory=Histogram)  # publish request round trip

    def error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def merge(self, other: Tick) -> None:
        """Add `other`'s deltas to this one; `open` is a gauge and is left to the caller."""
        self.opened += other.opened
        self.failed += other.failed
        self.dropped += other.dropped
        self.delivered += other.delivered
        self.published += other.published
        self.requests += other.requests
        self.publish_errors += other.publish_errors
        for reason, n in other.errors.items():
            self.errors[reason] = self.errors.get(reason, 0) + n
        self.latency_us.merge(other.latency_us)
        self.connect_us.merge(other.connect_us)
        self.request_us.merge(other.request_us)
