"""HubMetrics: every Prometheus metric of a hub node, built on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ssecore.liveness import Liveness

__all__ = ["HubMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class HubMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections_open = Gauge("hub_connections_open", "Open SSE streams on this node", registry=registry)
        self.connections_total = Counter("hub_connections_total", "SSE streams opened", registry=registry)
        self.channels_active = Gauge(
            "hub_channels_active", "Channels this node tails for its subscribers", registry=registry
        )
        self.events_published = Counter(
            "hub_events_published_total", "Events appended via this node", registry=registry
        )
        self.publish_replays = Counter(
            "hub_publish_replays_total",
            "Publish requests answered from an earlier one with the same Idempotency-Key (nothing appended)",
            registry=registry,
        )
        self.events_delivered = Counter(
            "hub_events_delivered_total", "Events written to subscribers (one per subscriber)", registry=registry
        )
        self.publish_seconds = Histogram(
            "hub_publish_duration_seconds",
            "Time to append one publish request",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.delivery_lag_seconds = Histogram(
            "hub_delivery_lag_seconds",
            "From append (the time in the stream id) to dispatch to subscriber connections",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.backend_errors = Counter(
            "hub_backend_errors_total", "Backend calls that failed", ["operation"], registry=registry
        )
        self.slow_disconnects = Counter(
            "hub_slow_consumer_disconnects_total", "Subscribers cut off for not reading", registry=registry
        )
        self.tail_breaks = Counter(
            "hub_tail_breaks_total",
            "Times the live tail found entries missing (trimmed unread, or the stream recreated) and ended streams",
            registry=registry,
        )
        self.limit_rejections = Counter(
            "hub_limit_rejections_total", "Requests refused by a limit", ["limit"], registry=registry
        )
        self.resumes = Counter(
            "hub_resumes_total",
            "Streams opened with Last-Event-ID, by where the missed events came from: this node's window or the store",
            ["source"],
            registry=registry,
        )
        self.subscribe_reads = Counter(
            "hub_subscribe_store_reads_total",
            "Store reads made to open streams: history pages of resumes, and the position of live joins",
            registry=registry,
        )
        self.resets = Counter("hub_resets_total", "reset events sent to subscribers", ["reason"], registry=registry)
        # The node's long-running loops (the live tail): how long since each went round, read at each scrape, and
        # /healthz's answer.
        self.liveness = Liveness()
        self.liveness.register(registry, "hub_loop_progress_age_seconds")
