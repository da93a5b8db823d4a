"""ProducerMetrics: every Prometheus metric of a worker, built on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ProducerMetrics"]

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATES = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class ProducerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.running = Gauge("producer_generations_running", "Generations running in this worker", registry=registry)
        self.finished = Counter(
            "producer_generations_finished_total",
            "Generations finished, by outcome",
            ["provider", "outcome"],
            registry=registry,
        )
        self.first_token_seconds = Histogram(
            "producer_time_to_first_token_seconds",
            "From start of the provider call to the first token",
            ["provider"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "producer_tokens_per_second",
            "Per generation, tokens per second after the first token",
            ["provider"],
            buckets=_RATES,
            registry=registry,
        )
        self.tokens = Counter("producer_tokens_total", "Tokens streamed", ["provider"], registry=registry)
        self.provider_errors = Counter(
            "producer_provider_errors_total",
            "Provider call failures, by HTTP status (or 'none') and code",
            ["provider", "status", "code"],
            registry=registry,
        )
        self.queue_lag_seconds = Histogram(
            "producer_queue_lag_seconds",
            "From submission to a worker starting the generation",
            buckets=_SECONDS,
            registry=registry,
        )
        self.restarts = Counter(
            "producer_generations_restarted_total",
            "Generations taken over from a worker that died",
            registry=registry,
        )
        self.append_round_trips = Counter(
            "producer_append_round_trips_total",
            "Round trips to the channel store for token appends",
            registry=registry,
        )
        self.appended_events = Counter(
            "producer_appended_events_total", "Events stored by those round trips", registry=registry
        )
