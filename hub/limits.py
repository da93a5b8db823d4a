"""Limits that keep one client from taking a node: open streams per node and per client, a publish rate per publisher
in events and in bytes (two token buckets), and the size of a generation job. Every refusal is counted in /metrics and
says which limit it hit.

A client is its token's subject, or its IP address in anonymous mode. The IP is the peer's, or, when the peer is a
trusted proxy, the nearest untrusted address in `X-Forwarded-For`.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .auth import Principal
from .errors import ApiError
from .metrics import HubMetrics
from .settings import HubSettings

__all__ = ["Limits", "TokenBucket"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Publisher buckets are forgotten once full again (idle); the sweep runs when this many are held.
_SWEEP_AT = 10_000


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # capacity
    tokens: float
    at: float  # monotonic time of `tokens`

    def wait(self, n: float, now: float) -> float:
        """Refill up to `now`, then the seconds until n tokens would be there (0: they are); takes nothing."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return 0.0 if n <= self.tokens else (n - self.tokens) / self.rate

    def take(self, n: float) -> None:
        """Take n tokens, once `wait(n, now)` answered 0: they are there, and refilling again would be wasted work."""
        self.tokens -= n

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.at) * self.rate >= self.burst


@dataclass(slots=True)
class _Publisher:
    """A publisher's two buckets: events, and request body bytes (an event count alone lets one client write hundreds
    of megabytes a second into the store)."""

    events: TokenBucket
    bytes: TokenBucket

    def full(self, now: float) -> bool:
        return self.events.full(now) and self.bytes.full(now)


def _networks(spec: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in spec.split(",") if p.strip())


class Limits:
    def __init__(self, settings: HubSettings, metrics: HubMetrics, *, clock: Callable[[], float] = time.monotonic):
        self._s = settings
        self._metrics = metrics
        self._clock = clock
        self._proxies = _networks(settings.trusted_proxies)
        self._streams: dict[str, int] = {}
        self._buckets: dict[str, _Publisher] = {}

    def _refuse(self, status: int, limit: str, message: str, retry_after_s: float | None) -> ApiError:
        self._metrics.limit_rejections.labels(limit).inc()
        # No Retry-After where waiting cannot help (a request too large is too large later as well).
        headers = {} if retry_after_s is None else {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
        return ApiError(status, limit, message, headers, extra={"limit": limit})

    # -- who -------------------------------------------------------------------------------------------------------

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in net for net in self._proxies)

    def client_ip(self, request: web.Request) -> str:
        peer = request.remote or "unknown"
        forwarded = request.headers.get("X-Forwarded-For")
        if not forwarded or not self._trusted(peer):
            return peer
        # Right to left: the first address not added by one of our own proxies is the client.
        for hop in reversed([h.strip() for h in forwarded.split(",")]):
            if not self._trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # a forged or broken header: fall back to what we can see
        return peer

    def client(self, request: web.Request, principal: Principal) -> str:
        return self.client_ip(request) if principal.kind == "anonymous" else f"{principal.kind}:{principal.subject}"

    # -- streams ---------------------------------------------------------------------------------------------------

    def open_stream(self, client: str, open_on_node: int) -> None:
        """Count a new stream for `client`, or refuse it. `close_stream(client)` uncounts it, once."""
        if open_on_node >= self._s.max_streams:
            raise self._refuse(
                503,
                "max_streams",
                f"this node serves its maximum of {self._s.max_streams} streams; retry on another",
                1,
            )
        held = self._streams.get(client, 0)
        if held >= self._s.max_streams_per_client:
            raise self._refuse(
                429, "max_streams_per_client", f"at most {self._s.max_streams_per_client} open streams per client", 5
            )
        self._streams[client] = held + 1

    def close_stream(self, client: str) -> None:
        # No closure per stream to remember this: the stream's handler keeps `client` and calls this once.
        left = self._streams.get(client, 1) - 1
        if left > 0:
            self._streams[client] = left
        else:
            self._streams.pop(client, None)

    # -- generations -----------------------------------------------------------------------------------------------

    def too_many_generations(self) -> ApiError:
        """The refusal of a generation over --max-generations-per-client (counted by the job queue, over all nodes)."""
        n = self._s.max_generations_per_client
        message = f"at most {n} generations queued or running at once per client"
        return self._refuse(429, "max_generations_per_client", message, 5)

    # -- publishing ------------------------------------------------------------------------------------------------

    def publish(self, client: str, events: int, nbytes: int) -> None:
        """Charge `events` and `nbytes` (the request body) to the publisher's buckets, or refuse the whole request
        (429) and charge neither."""
        now = self._clock()
        pub = self._buckets.get(client)
        if pub is None:
            if len(self._buckets) >= _SWEEP_AT:
                self._buckets = {k: p for k, p in self._buckets.items() if not p.full(now)}
            s = self._s
            pub = self._buckets[client] = _Publisher(
                TokenBucket(s.publish_rate, float(s.publish_burst), float(s.publish_burst), now),
                TokenBucket(
                    float(s.publish_bytes_rate), float(s.publish_bytes_burst), float(s.publish_bytes_burst), now
                ),
            )
        # Settings keep --max-batch within --publish-burst and --max-body within --publish-bytes-burst, so one
        # request always fits an idle bucket.
        wait_s = pub.events.wait(events, now)
        if wait_s > 0:
            raise self._refuse(429, "publish_rate", f"publish rate over {self._s.publish_rate:g} events/s", wait_s)
        wait_s = pub.bytes.wait(nbytes, now)
        if wait_s > 0:
            raise self._refuse(
                429, "publish_bytes_rate", f"publish rate over {self._s.publish_bytes_rate} bytes/s", wait_s
            )
        pub.events.take(events)
        pub.bytes.take(nbytes)

    # -- generation jobs -------------------------------------------------------------------------------------------

    def job_bytes(self, nbytes: int) -> None:
        """Refuse (413) a generation request whose body is over --max-job-bytes."""
        if nbytes > self._s.max_job_bytes:
            raise self._refuse(
                413, "max_job_bytes", f"a generation request is at most {self._s.max_job_bytes} bytes", None
            )
