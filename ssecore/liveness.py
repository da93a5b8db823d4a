"""Liveness: whether a process's long-running loops still go round.

A loop that waits for a wake-up that never comes, or for a call that never returns, looks healthy from outside: the
process answers and its metrics stay green. So each loop says when it last made progress (`beat`), and the process's
`/healthz` fails once one has not for longer than its bound, so that the orchestrator restarts it.

Progress means going round, not succeeding: a loop that fails every round because Redis is down is alive (readiness
says the rest), and a loop that waits for something it knows it is waiting for (free slots, a subscriber) beats while
it waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Liveness"]


@dataclass(slots=True)
class _Loop:
    bound_s: float
    last: float


class Liveness:
    """The loops of one process, each with the most seconds it may go without progress."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loops: dict[str, _Loop] = {}

    def watch(self, name: str, bound_s: float) -> None:
        """Watch a loop from now on: it counts as having made progress now."""
        if bound_s <= 0:
            raise ValueError(f"the bound of loop {name!r} must be positive")
        self._loops[name] = _Loop(bound_s, self._clock())

    def forget(self, name: str) -> None:
        """The loop ended on purpose (shutdown): it is no longer expected to go round."""
        self._loops.pop(name, None)

    def beat(self, name: str) -> None:
        loop = self._loops.get(name)
        if loop is not None:
            loop.last = self._clock()

    def ages(self) -> dict[str, float]:
        """Seconds since each watched loop last made progress."""
        now = self._clock()
        return {name: now - loop.last for name, loop in self._loops.items()}

    def stuck(self) -> list[str]:
        """The loops past their bound, by name."""
        now = self._clock()
        return sorted(name for name, loop in self._loops.items() if now - loop.last > loop.bound_s)

    def report(self) -> tuple[int, bytes]:
        """The answer of `/healthz`: 200 while every loop goes round, 503 naming the stuck ones."""
        now = self._clock()
        loops = {
            name: {"age_s": round(now - loop.last, 3), "bound_s": loop.bound_s} for name, loop in self._loops.items()
        }
        stuck = self.stuck()
        body: dict[str, object] = {"status": "stuck" if stuck else "ok", "loops": loops}
        if stuck:
            body["stuck"] = stuck
        return (503 if stuck else 200), orjson.dumps(body)

    def register(self, registry: CollectorRegistry, metric: str) -> None:
        """Export the ages as the gauge `metric{loop=...}`, read at each scrape."""
        registry.register(_AgeCollector(self, metric))


class _AgeCollector(Collector):
    def __init__(self, liveness: Liveness, metric: str) -> None:
        self._liveness = liveness
        self._metric = metric

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            self._metric, "Seconds since each long-running loop last made progress", labels=["loop"]
        )
        for name, age in sorted(self._liveness.ages().items()):
            family.add_metric([name], age)
        yield family
