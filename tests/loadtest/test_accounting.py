"""Delivery accounting (gaps, duplicates, order) and exact percentiles, on known data."""

from __future__ import annotations

import math
import pickle
import random

import pytest

from loadtest.accounting import Histogram, SequenceTracker, StreamTotals, Tick


def _track(*seqs: int) -> SequenceTracker:
    t = SequenceTracker()
    for s in seqs:
        t.see(s)
    return t


def test_in_order_delivery_is_complete_and_clean() -> None:
    t = _track(0, 1, 2, 3)
    assert t.complete(4)
    assert (t.missing(4), t.gaps(4), t.duplicates, t.out_of_order, t.beyond(4)) == ([], 0, 0, 0, 0)
    assert not t.complete(5)
    assert t.missing(5) == [4]


def test_a_hole_in_the_middle_is_one_gap_of_the_missing_events() -> None:
    t = _track(0, 1, 4, 5)
    assert t.missing(6) == [2, 3]
    assert t.gaps(6) == 1
    assert not t.complete(6)


def test_separate_holes_and_a_missing_tail_are_counted_as_separate_gaps() -> None:
    t = _track(0, 2, 4)
    assert t.missing(7) == [1, 3, 5, 6]
    assert t.gaps(7) == 3


def test_nothing_received_is_one_gap_of_everything() -> None:
    t = SequenceTracker()
    assert t.missing(3) == [0, 1, 2]
    assert t.gaps(3) == 1
    assert t.complete(0)


def test_a_repeated_event_is_a_duplicate_not_a_gap() -> None:
    t = _track(0, 1, 1, 2, 0)
    assert t.duplicates == 2
    assert t.out_of_order == 0
    assert t.complete(3)
    assert t.received == 5


def test_a_late_event_is_out_of_order_and_fills_its_hole() -> None:
    t = _track(0, 2, 1, 3)
    assert t.out_of_order == 1
    assert t.duplicates == 0
    assert t.complete(4)
    assert t.gaps(4) == 0


def test_a_late_event_seen_twice_is_out_of_order_once_and_a_duplicate_once() -> None:
    t = _track(0, 3, 1, 1, 2)
    assert (t.out_of_order, t.duplicates) == (2, 1)
    assert t.complete(4)


def test_events_past_the_published_count_are_counted_as_beyond() -> None:
    t = _track(0, 1, 2, 3, 5)
    assert t.beyond(3) == 2  # 3 and 5 were seen; 4 is a hole past the end and is not counted
    assert t.missing(3) == []


def test_stream_totals_sum_subscribers_and_name_every_problem() -> None:
    totals = StreamTotals()
    totals.add(_track(0, 1, 2), 3)
    totals.add(_track(0, 2, 2), 3)
    assert (totals.subscribers, totals.complete, totals.expected, totals.delivered) == (2, 1, 6, 6)
    assert (totals.missing, totals.gaps, totals.duplicates) == (1, 1, 1)
    other = StreamTotals(dropped=1)
    totals.merge(other)
    problems = totals.problems()
    assert "1 events missing" in problems
    assert "1 duplicates" in problems
    assert "1 streams dropped" in problems
    assert StreamTotals(expected=3, delivered=3).problems() == []


def test_percentiles_of_one_to_a_hundred_are_their_ranks() -> None:
    h = Histogram()
    values = list(range(1, 101))
    random.Random(1).shuffle(values)
    h.extend(values)
    assert h.percentiles([50, 90, 99, 100]) == [50, 90, 99, 100]
    assert h.percentile(0.5) == 1
    assert (h.min(), h.max(), h.count, h.mean()) == (1, 100, 100, 50.5)


def test_percentile_ranks_use_the_decimal_as_written() -> None:
    h = Histogram()
    h.extend(range(1, 1001))
    # 99.9% of 1000 is exactly 999; a binary rounding up of 99.9 would give rank 1000.
    assert h.percentile(99.9) == 999
    assert h.percentile(99.95) == 1000


def test_percentiles_count_repeated_values() -> None:
    h = Histogram()
    h.extend([5] * 98 + [7, 1000])
    assert h.percentiles([50, 98, 99, 100]) == [5, 5, 7, 1000]


def test_percentiles_match_nearest_rank_on_the_sorted_samples() -> None:
    rng = random.Random(7)
    samples = [int(rng.lognormvariate(7, 1)) for _ in range(5000)]
    left, right = Histogram(), Histogram()
    left.extend(samples[:1234])
    right.extend(samples[1234:])
    left.merge(right)  # merged counts give the same answer as one histogram of every sample
    ordered = sorted(samples)
    for q in (1, 25, 50, 90, 99, 99.9, 100):
        assert left.percentile(q) == ordered[math.ceil(q * len(ordered) / 100) - 1]


def test_percentiles_refuse_no_samples_and_out_of_range_ranks() -> None:
    with pytest.raises(ValueError):
        Histogram().percentile(50)
    h = Histogram()
    h.add(1)
    for q in (0, -1, 100.5):
        with pytest.raises(ValueError):
            h.percentile(q)


def test_ticks_merge_counters_and_histograms_and_survive_pickling() -> None:
    a = Tick(opened=2, delivered=5)
    a.error("http_503")
    a.latency_us.add(10)
    b = pickle.loads(pickle.dumps(Tick(opened=1, failed=1, delivered=1)))
    b.error("http_503")
    b.latency_us.add(20)
    a.merge(b)
    assert (a.opened, a.failed, a.delivered) == (3, 1, 6)
    assert a.errors == {"http_503": 2}
    assert a.latency_us.counts == {10: 1, 20: 1}
