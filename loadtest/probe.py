"""Hub probes, from outside the hub: RSS and CPU (user + system) of its processes from /proc, and the counters of its
Prometheus `/metrics` pages."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

__all__ = [
    "LAG_BUCKETS",
    "MetricsProbe",
    "ProcProbe",
    "ProcSample",
    "lag_p99_bound_ms",
    "metrics_delta",
    "parse_metrics",
    "read_proc",
]

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcSample:
    at_s: float  # time.monotonic() of the sample
    rss_bytes: int
    cpu_s: float  # user + system, since the process started


def read_proc(pid: int) -> ProcSample:
    """One process's RSS (statm) and CPU time (stat fields 14 and 15). Raises OSError if it is gone."""
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * _PAGE_BYTES
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
        rest = f.read().rsplit(")", 1)[1].split()
    return ProcSample(time.monotonic(), rss, (int(rest[11]) + int(rest[12])) / _CLOCK_TICKS)


class ProcProbe:
    """The hub processes given by --pid, summed; remembers the peak RSS of every sample taken."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = tuple(pids)
        self.peak_rss_bytes = 0
        self.errors: list[str] = []

    def sample(self) -> ProcSample | None:
        """RSS and CPU of all the processes together; None without --pid or when one of them is gone."""
        if not self.pids:
            return None
        try:
            samples = [read_proc(pid) for pid in self.pids]
        except OSError as e:
            if not self.errors:
                self.errors.append(f"cannot read /proc of the hub: {e}")
            return None
        out = ProcSample(time.monotonic(), sum(s.rss_bytes for s in samples), sum(s.cpu_s for s in samples))
        self.peak_rss_bytes = max(self.peak_rss_bytes, out.rss_bytes)
        return out


# The one histogram whose buckets are kept: the hub's own delivery lag, so that its p99 can be put beside the
# end-to-end one (`lag_p99_bound_ms`). Other buckets would only lengthen the results.
LAG_BUCKETS = "hub_delivery_lag_seconds_bucket"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → value per metric name, summed over label sets, and per labelled series as
    `name{labels}` too (histogram buckets left out, but for LAG_BUCKETS, kept per series only)."""
    out: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        series = None
        if "}" in line:
            name = line.split("{", 1)[0]
            series, rest = line.rsplit("}", 1)
            series += "}"
            fields = rest.split()
        else:
            name, *fields = line.split()
        if not fields:
            continue
        value_text = fields[0]
        if name.endswith("_created") or (name.endswith("_bucket") and name != LAG_BUCKETS):
            continue
        try:
            value = float(value_text)
        except ValueError:
            continue
        if name != LAG_BUCKETS:  # a sum over a histogram's buckets means nothing
            out[name] = out.get(name, 0.0) + value
        if series is not None:
            out[series] = out.get(series, 0.0) + value
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much each counter (and histogram sum and count) grew between two scrapes."""
    return {
        name: after[name] - before.get(name, 0.0)
        for name in sorted(after)
        if name.split("{", 1)[0].endswith(("_total", "_sum", "_count", "_bucket"))
    }


def lag_p99_bound_ms(delta: dict[str, float]) -> float | None:
    """From a `metrics_delta`: the upper bound of the LAG_BUCKETS bucket that holds the 99th percentile, in ms (the
    hub's own delivery lag, p99 at most this); None without samples or with it above the last finite bucket."""
    buckets: list[tuple[float, float]] = []
    for series, count in delta.items():
        if series.startswith(LAG_BUCKETS + "{") and 'le="' in series:
            bound = series.split('le="', 1)[1].split('"', 1)[0]
            try:
                buckets.append((float(bound), count))  # "+Inf" parses as inf
            except ValueError:
                continue
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    for upper, count in buckets:
        if count >= 0.99 * total:
            return None if upper == float("inf") else round(upper * 1000, 3)
    return None


class RedisProbe:
    """Counts the commands a Redis server has executed (INFO commandstats), to put a cost in store commands on a
    phase of a run. Everything that talks to that Redis is counted; the scenario subtracts the steady rate."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.errors: list[str] = []

    async def commands(self) -> dict[str, int] | None:
        """Calls so far per command (`evalsha`, `xread`, …), or None without a URL or when Redis cannot be read."""
        if self.url is None:
            return None
        import redis.asyncio as aioredis  # only runs that count store commands need it

        client = aioredis.from_url(self.url, socket_timeout=5.0)
        try:
            stats = await client.info("commandstats")
        except (OSError, aioredis.RedisError) as e:
            self.errors.append(f"cannot read commandstats of {self.url}: {e}")
            return None
        finally:
            await client.aclose()
        # Our own INFO calls are counted too (cmdstat_info): leave them out.
        return {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in stats.items()
            if k != "cmdstat_info" and isinstance(v, dict)
        }


class MetricsProbe:
    """Scrapes the --metrics-url pages and sums them (several nodes read as one)."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = tuple(urls)
        self.errors: list[str] = []

    async def scrape(self, session: aiohttp.ClientSession) -> dict[str, float] | None:
        if not self.urls:
            return None
        total: dict[str, float] = {}
        for url in self.urls:
            try:
                async with session.get(url) as resp:
                    text = await resp.text()
                    if resp.status != 200:
                        raise aiohttp.ClientError(f"HTTP {resp.status}")
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                self.errors.append(f"cannot scrape {url}: {e}")
                return None
            for name, value in parse_metrics(text).items():
                total[name] = total.get(name, 0.0) + value
        return total
