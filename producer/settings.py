"""ProducerSettings: every setting of a worker in one frozen dataclass, with its flag and environment variable.

`--name` on the command line, `PRODUCER_NAME` in the environment (flags win). Provider credentials come from the
providers' usual variables (OPENAI_API_KEY, OPENAI_BASE_URL, ANTHROPIC_API_KEY, ...), read in `__main__` only.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from ssecore.provider_file import ProviderFileError, load_provider_file
from ssecore.queue_redis import DEFAULT_GROUP
from ssecore.settings import (
    DEFAULT_HISTORY,
    DEFAULT_KEY_PREFIX,
    DEFAULT_TTL_S,
    RedisSettings,
    settings_from_args,
)
from ssecore.settings import opt as _opt
from ssecore.startup import setting

from .coalesce import DEFAULT_WINDOW_MS
from .providers.base import Provider
from .providers.registry import build_providers

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_STALL_AFTER_S",
    "REDIS_TIMEOUT_S",
    "ProducerSettings",
    "ProviderKeys",
    "providers_for",
]


# Longer than any Redis call may take (their deadlines are a few seconds) and than a loaded machine may pause a loop,
# short enough that Kubernetes restarts a worker that stopped taking jobs within a couple of minutes.
DEFAULT_STALL_AFTER_S = 60.0
# The deadline of each Redis call of a worker process (a hub's embedded worker has the hub's --redis-timeout). Each
# loop's liveness bound includes it, so that Redis being down, which makes every round wait this long, is not a stall.
REDIS_TIMEOUT_S = 5.0


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderKeys:
    """Credentials and endpoints from the providers' own environment variables. Never logged."""

    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    anthropic_api_key: str | None = field(default=None, repr=False)
    anthropic_base_url: str | None = None
    gemini_api_key: str | None = field(default=None, repr=False)
    gemini_base_url: str | None = None
    # The environment, for the keys a providers file names by variable (`api_key_env`).
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProviderKeys:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "environ"]
        return cls(**{name: environ.get(name.upper()) or None for name in names}, environ=dict(environ))


@dataclass(frozen=True, slots=True, kw_only=True)
class ProducerSettings(RedisSettings):
    ENV_PREFIX: ClassVar[str] = "PRODUCER_"

    key_prefix: str = _opt(DEFAULT_KEY_PREFIX, "key-prefix", "prefix of every Redis key (the hub's)")
    history: int = _opt(DEFAULT_HISTORY, "history", "events kept per channel (the hub's setting)")
    ttl_s: float = _opt(DEFAULT_TTL_S, "ttl", "seconds a channel and a generation record live (the hub's setting)")
    concurrency: int = _opt(64, "concurrency", "generations at once in this process")
    group: str = _opt(DEFAULT_GROUP, "group", "consumer group of the job stream")
    consumer: str = _opt("", "consumer", "this worker's name in the group (default: host-pid)")
    claim_idle_s: float = _opt(30.0, "claim-idle", "seconds without a claim renewal before another worker takes a job")
    renew_s: float = _opt(5.0, "renew", "seconds between claim renewals of running jobs")
    poll_s: float = _opt(0.25, "poll", "seconds between checks for cancel requests and unwatched channels")
    grace_s: float = _opt(10.0, "grace", "seconds running generations may take to finish on shutdown")
    coalesce_ms: float = _opt(
        DEFAULT_WINDOW_MS, "coalesce-ms", "most milliseconds a token waits to be gathered into one round trip (0: off)"
    )
    max_attempts: int = _opt(4, "max-attempts", "provider calls per generation before the first token")
    backoff_s: float = _opt(0.5, "backoff", "first retry delay, doubled each attempt (Retry-After wins)")
    backoff_max_s: float = _opt(30.0, "backoff-max", "longest retry delay")
    connect_timeout_s: float = _opt(10.0, "connect-timeout", "provider connect timeout, seconds")
    openai_timeout_s: float = _opt(60.0, "openai-timeout", "longest silence in an OpenAI stream, seconds")
    anthropic_timeout_s: float = _opt(60.0, "anthropic-timeout", "longest silence in an Anthropic stream, seconds")
    anthropic_max_tokens: int = _opt(
        1024, "anthropic-max-tokens", "output cap of an Anthropic request that sets none (the API requires one)"
    )
    gemini_timeout_s: float = _opt(60.0, "gemini-timeout", "longest silence in a Gemini stream, seconds")
    providers_file: str | None = _opt(
        None, "providers-file", "named provider endpoints, JSON or YAML (docs/workers.md): their jobs come here"
    )
    first_byte_timeout_s: float = _opt(
        300.0,
        "first-byte-timeout",
        "longest wait for a provider's first byte, seconds (a reasoning model thinks first)",
    )
    demo: bool = _opt(True, "demo", "run demo jobs (no network; for trials); --no-demo ends them as unknown_provider")
    demo_tokens_per_s: float = _opt(30.0, "demo-tokens-per-s", "pace of the demo provider (0: as fast as possible)")
    metrics_port: int = _opt(9101, "metrics-port", "port of this worker's /metrics, /healthz and /readyz (0: none)")
    metrics_host: str = _opt(
        "0.0.0.0", "metrics-host", "address of that port (0.0.0.0: every interface, for in-cluster scraping)"
    )
    stall_after_s: float = _opt(
        DEFAULT_STALL_AFTER_S,
        "stall-after",
        "seconds a worker loop may take beyond its own period before /healthz fails (503 naming the loop)",
    )
    log_level: str = _opt("info", "log-level", "debug, info, warning or error")

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"invalid setting {setting('PRODUCER_', name)}: {what}")

        need(self.concurrency >= 1, "concurrency", "must be at least 1")
        # Braces would make a hash tag of the prefix: on a cluster every key would share one slot, or keys meant to
        # share one would not.
        need(not {"{", "}"} & set(self.key_prefix), "key-prefix", "must not contain { or }")
        need(self.first_byte_timeout_s > 0, "first-byte-timeout", "must be positive")
        need(1 <= self.anthropic_max_tokens <= 1_000_000, "anthropic-max-tokens", "must be 1-1000000")
        if self.providers_file:
            try:
                load_provider_file(self.providers_file)  # every mistake in it, in one line, now
            except ProviderFileError as e:
                need(False, "providers-file", str(e))
        # A renewal may be late by a poll or a slow round trip; three renewals per claim-idle leave room for that.
        need(self.renew_s > 0 and self.claim_idle_s >= 3 * self.renew_s, "claim-idle", "must be at least 3 x --renew")
        need(self.poll_s > 0, "poll", "must be positive")
        need(self.grace_s >= 0, "grace", "must not be negative")
        need(0 <= self.coalesce_ms <= 1000, "coalesce-ms", "must be 0-1000")
        need(self.max_attempts >= 1, "max-attempts", "must be at least 1")
        need(self.demo_tokens_per_s >= 0, "demo-tokens-per-s", "must not be negative")
        need(0 <= self.metrics_port <= 65535, "metrics-port", "must be 0-65535")
        need(bool(self.metrics_host), "metrics-host", "must be an address of this host, such as 0.0.0.0 or 127.0.0.1")
        need(self.stall_after_s > 0, "stall-after", "must be positive")
        need(self.log_level in ("debug", "info", "warning", "error"), "log-level", "debug, info, warning or error")
        self.check_redis(need, redis_timeout_s=REDIS_TIMEOUT_S)
        if not self.consumer:
            object.__setattr__(self, "consumer", _default_consumer())

    @classmethod
    def from_args(cls, argv: Sequence[str] | None, environ: Mapping[str, str]) -> ProducerSettings:
        """Build settings from flags over `PRODUCER_*` environment variables over defaults."""
        return settings_from_args(cls, "PRODUCER_", "python -m producer", argv, environ)


def providers_for(settings: ProducerSettings, keys: ProviderKeys) -> dict[str, Provider]:
    """The providers of a worker with these settings and credentials: the built-ins, and its providers file's."""
    entries = load_provider_file(settings.providers_file) if settings.providers_file else {}
    return build_providers(
        demo=settings.demo,
        demo_tokens_per_s=settings.demo_tokens_per_s,
        connect_timeout_s=settings.connect_timeout_s,
        first_byte_timeout_s=settings.first_byte_timeout_s,
        openai=(keys.openai_api_key, keys.openai_base_url, settings.openai_timeout_s),
        anthropic=(keys.anthropic_api_key, keys.anthropic_base_url, settings.anthropic_timeout_s),
        anthropic_max_tokens=settings.anthropic_max_tokens,
        gemini=(keys.gemini_api_key, keys.gemini_base_url, settings.gemini_timeout_s),
        entries=entries,
        environ=keys.environ,
    )
