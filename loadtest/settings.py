"""LoadSettings: every setting of one load-test run in a frozen dataclass, with its defaults and validation.

Built by `loadtest.__main__` from flags and `LOADTEST_*` variables (scenario defaults in between), or directly by tests.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from producer.coalesce import DEFAULT_WINDOW_MS

__all__ = [
    "DEFAULT_CHANNELS",
    "DEFAULT_CONNECTIONS",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_DRAIN_TIMEOUT_S",
    "DEFAULT_DURATION_S",
    "DEFAULT_RAMP_PER_S",
    "DEFAULT_RATE_PER_S",
    "DEFAULT_URL",
    "LoadSettings",
]

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONNECTIONS = 1000
DEFAULT_CHANNELS = 10
DEFAULT_RAMP_PER_S = 1000.0
DEFAULT_RATE_PER_S = 100.0
DEFAULT_DURATION_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 30.0
DEFAULT_DRAIN_TIMEOUT_S = 10.0
# The hub's own default --max-batch; a larger batch would only measure 413 answers.
MAX_BATCH = 1000


def _cpu_count() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSettings:
    scenario: str  # a name in loadtest.scenario.SCENARIOS
    urls: tuple[str, ...] = (DEFAULT_URL,)  # hub base URLs; connections and publish requests go round-robin
    target: str = "hub"  # the adapter that knows the server's URLs and publish API (loadtest.adapters)
    connections: int = DEFAULT_CONNECTIONS  # subscribers (idle, fanout) or concurrent publish loops (publish)
    channels: int = DEFAULT_CHANNELS  # channels the connections are spread over
    ramp_per_s: float = DEFAULT_RAMP_PER_S  # connections opened per second, over all workers
    rate_per_s: float = DEFAULT_RATE_PER_S  # events published per second in total; 0: as fast as possible (publish)
    batch: int = 1  # events per publish request
    payload_bytes: int = 0  # bytes of padding in each event's data
    duration_s: float = DEFAULT_DURATION_S  # how long to publish (or hold idle connections), when `events` is None
    events: int | None = None  # publish exactly this many events in total instead of running for `duration_s`
    workers: int = field(default_factory=_cpu_count)  # client processes sharing the connections
    pids: tuple[int, ...] = ()  # hub processes to sample RSS and CPU of, from /proc
    metrics_urls: tuple[str, ...] = ()  # hub /metrics URLs scraped before and after the measured window
    json_out: str | None = None  # write the result as JSON here
    markdown_out: str | None = None  # write the result as a Markdown table here
    plot_out: str | None = None  # write a PNG of latency and throughput over time here (needs matplotlib)
    token: str | None = field(default=None, repr=False)  # sent as `Authorization: Bearer` when set
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S  # one connection's deadline to get its stream going
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S  # after the last publish: wait this long for stragglers
    redis_url: str | None = None  # the hub's Redis: generations append to it; store commands are counted on it
    key_prefix: str = "hub:"  # the hub's --key-prefix, for appends to its Redis
    coalesce_ms: float = DEFAULT_WINDOW_MS  # generations: the producer's --coalesce-ms
    # Local addresses the subscribers' connections come from, in turn: one address reaches one server address from
    # about 28,000 ports only, so a node filled to 100,000 needs several (on loopback, any of 127.0.0.0/8).
    source_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"invalid setting --{name} (LOADTEST_{name.upper().replace('-', '_')}): {what}")

        need(bool(self.urls), "url", "give at least one hub base URL")
        for url in (*self.urls, *self.metrics_urls):
            parts = urlsplit(url)
            need(parts.scheme in ("http", "https") and bool(parts.hostname), "url", f"{url!r} is not an http(s) URL")
        need(self.connections >= 1, "connections", "must be at least 1")
        need(self.channels >= 1, "channels", "must be at least 1")
        need(self.ramp_per_s > 0, "ramp", "must be positive")
        need(self.rate_per_s >= 0, "rate", "must not be negative")
        need(1 <= self.batch <= MAX_BATCH, "batch", f"must be 1-{MAX_BATCH}")
        need(self.payload_bytes >= 0, "payload", "must not be negative")
        need(self.duration_s > 0, "duration", "must be positive")
        need(self.events is None or self.events >= 1, "events", "must be at least 1")
        need(self.workers >= 1, "workers", "must be at least 1")
        need(all(p > 0 for p in self.pids), "pid", "must be process ids")
        need(self.connect_timeout_s > 0, "connect-timeout", "must be positive")
        need(self.drain_timeout_s >= 0, "drain-timeout", "must not be negative")
        need(
            self.redis_url is None or urlsplit(self.redis_url).scheme in ("redis", "rediss", "unix"),
            "redis-url",
            "must be a redis://, rediss:// or unix:// URL",
        )
        need(0 <= self.coalesce_ms <= 1000, "coalesce-ms", "must be 0-1000")
        for address in self.source_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                need(False, "source-addresses", f"{address!r} is not an IP address (or a range A-B of them)")

    @property
    def client_workers(self) -> int:
        """Worker processes that share the connections: never more than there are connections."""
        return min(self.workers, self.connections)


def address_range(spec: str) -> tuple[str, ...]:
    """`127.0.0.2-127.0.0.9` as the addresses it spans (both ends included); a single address as itself."""
    first, dash, last = spec.partition("-")
    if not dash:
        return (spec.strip(),)
    try:
        low, high = ipaddress.ip_address(first.strip()), ipaddress.ip_address(last.strip())
    except ValueError:
        raise ValueError(f"invalid setting --source-addresses: {spec!r} is not a range of IP addresses") from None
    if low.version != high.version or not 0 <= int(high) - int(low) < 65536:
        raise ValueError(f"invalid setting --source-addresses: {spec!r} must go up, within 65,536 addresses")
    return tuple(str(ipaddress.ip_address(int(low) + k)) for k in range(int(high) - int(low) + 1))
