"""Liveness: a loop that stops going round is reported stuck, as a metric and in /healthz's answer."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hub.liveness import Liveness


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_past_its_bound_is_stuck_until_it_beats_again() -> None:
    clock = _Clock()
    live = Liveness(clock)
    live.watch("fetch", 10.0)
    live.watch("renew", 3.0)
    clock.now += 5
    live.beat("fetch")
    assert live.stuck() == ["renew"]
    status, body = live.report()
    assert status == 503
    answer = orjson.loads(body)
    assert answer["status"] == "stuck" and answer["stuck"] == ["renew"]
    assert answer["loops"]["fetch"]["age_s"] == 0 and answer["loops"]["renew"]["age_s"] == 5
    live.beat("renew")
    assert live.stuck() == [] and live.report()[0] == 200


def test_a_forgotten_loop_is_no_longer_expected() -> None:
    clock = _Clock()
    live = Liveness(clock)
    live.watch("claim", 1.0)
    live.forget("claim")
    clock.now += 60
    assert live.stuck() == [] and live.ages() == {}


def test_the_ages_are_a_gauge_read_at_each_scrape() -> None:
    clock = _Clock()
    live = Liveness(clock)
    registry = CollectorRegistry()
    live.register(registry, "test_loop_progress_age_seconds")
    live.watch("tail", 30.0)
    clock.now += 7.5
    assert 'test_loop_progress_age_seconds{loop="tail"} 7.5' in generate_latest(registry).decode()


def test_a_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tail"):
        Liveness().watch("tail", 0)
