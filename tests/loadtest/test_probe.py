"""The load tester's reading of the hub's /metrics: counters as deltas, and the hub's own lag p99 from its buckets."""

from __future__ import annotations

from loadtest.probe import lag_p99_bound_ms, metrics_delta, parse_metrics

_PAGE = """# HELP hub_delivery_lag_seconds lag
# TYPE hub_delivery_lag_seconds histogram
hub_delivery_lag_seconds_bucket{le="0.001"} %d
hub_delivery_lag_seconds_bucket{le="0.005"} %d
hub_delivery_lag_seconds_bucket{le="0.025"} %d
hub_delivery_lag_seconds_bucket{le="+Inf"} %d
hub_delivery_lag_seconds_count %d
hub_delivery_lag_seconds_sum 1.5
hub_publish_seconds_bucket{le="0.01"} 7
hub_events_delivered_total %d
"""


def page(b1: int, b5: int, b25: int, inf: int, delivered: int) -> dict[str, float]:
    return parse_metrics(_PAGE % (b1, b5, b25, inf, inf, delivered))


def test_the_p99_bound_is_the_bucket_that_holds_the_99th_percentile_of_the_window() -> None:
    before = page(100, 100, 100, 100, 100)  # what happened before the window does not count
    # In the window: 1,000 samples, 900 under 1 ms, 985 under 5 ms, 995 under 25 ms, 5 above.
    after = page(1000, 1085, 1095, 1100, 1100)
    delta = metrics_delta(before, after)
    assert delta["hub_events_delivered_total"] == 1000
    assert lag_p99_bound_ms(delta) == 25.0
    # Only the lag's buckets are kept, and never summed into a meaningless total.
    assert "hub_delivery_lag_seconds_bucket" not in delta
    assert not any(k.startswith("hub_publish_seconds_bucket") for k in delta)


def test_no_bound_without_samples_or_when_the_p99_is_past_the_last_bucket() -> None:
    same = page(10, 10, 10, 10, 10)
    assert lag_p99_bound_ms(metrics_delta(same, same)) is None
    assert lag_p99_bound_ms(metrics_delta(page(0, 0, 0, 0, 0), page(0, 0, 90, 100, 0))) is None
    assert lag_p99_bound_ms(metrics_delta(page(0, 0, 0, 0, 0), page(99, 99, 100, 100, 0))) == 1.0
