"""HubSettings: every setting of a hub node in one frozen dataclass, with its flag, environment variable and default.

`--name` on the command line, `HUB_NAME` in the environment (flags win). Validated at construction, so a bad value
stops the process at start with a message naming the setting.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ssecore.backend import DEFAULT_IDEMPOTENCY_WINDOW_S
from ssecore.provider_file import ProviderFileError, load_provider_file
from ssecore.settings import (
    DEFAULT_HISTORY,
    DEFAULT_KEY_PREFIX,
    DEFAULT_TTL_S,
    RedisSettings,
    settings_from_args,
)
from ssecore.settings import opt as _opt
from ssecore.startup import setting

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_HISTORY",
    "DEFAULT_RETRY_MS",
    "DEFAULT_TTL_S",
    "TAIL_BACKOFF_MAX_S",
    "HubSettings",
    "settings_from_args",
]

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8080
DEFAULT_HEARTBEAT_S = 15.0
DEFAULT_RETRY_MS = 2_000
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_GRACE_S = 10.0
DEFAULT_REDIS_TIMEOUT_S = 3.0
DEFAULT_MAX_BUFFER_BYTES = 1 << 20
DEFAULT_REPLAY_PAGE = 500
DEFAULT_TAIL_BLOCK_S = 5.0
DEFAULT_RESUME_WINDOW_BYTES = 64 * 1024
DEFAULT_LINGER_S = 10.0
DEFAULT_PUBLISH_BYTES_RATE = 1 << 20
DEFAULT_PUBLISH_BYTES_BURST = 4 << 20
DEFAULT_MAX_JOB_BYTES = 512 * 1024
# The longest the live tail waits after a failed read before the next. A round with Redis down is a read that fails
# after at most tail-block + redis-timeout, then this pause: --tail-stuck-after must leave room for both.
TAIL_BACKOFF_MAX_S = 2.0

_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class HubSettings(RedisSettings):
    ENV_PREFIX: ClassVar[str] = "HUB_"

    host: str = _opt(DEFAULT_HOST, "host", "address to listen on")
    port: int = _opt(DEFAULT_PORT, "port", "TCP port to listen on")
    key_prefix: str = _opt(DEFAULT_KEY_PREFIX, "key-prefix", "prefix of every Redis key this hub uses")
    history: int = _opt(DEFAULT_HISTORY, "history", "events kept per channel (approximately, like MAXLEN ~)")
    ttl_s: float = _opt(DEFAULT_TTL_S, "ttl", "seconds a channel lives after its last publish")
    heartbeat_s: float = _opt(DEFAULT_HEARTBEAT_S, "heartbeat", "seconds between keep-alive comments")
    retry_ms: int = _opt(DEFAULT_RETRY_MS, "retry-ms", "reconnection delay hint sent to clients (retry:)")
    max_body_bytes: int = _opt(DEFAULT_MAX_BODY_BYTES, "max-body", "largest publish body accepted, in bytes")
    log_level: str = _opt("info", "log-level", "debug, info, warning or error")
    grace_s: float = _opt(DEFAULT_GRACE_S, "grace", "seconds a shutdown may take before streams are cut")
    redis_timeout_s: float = _opt(DEFAULT_REDIS_TIMEOUT_S, "redis-timeout", "deadline of one Redis call, seconds")
    max_buffer_bytes: int = _opt(
        DEFAULT_MAX_BUFFER_BYTES, "max-buffer", "bytes a subscriber may leave unread before it is cut off"
    )
    replay_page: int = _opt(DEFAULT_REPLAY_PAGE, "replay-page", "history entries read per round trip on resume")
    tail_block_s: float = _opt(
        DEFAULT_TAIL_BLOCK_S, "tail-block", "how often the live tail reads every channel from the store, seconds"
    )
    resume_window_bytes: int = _opt(
        DEFAULT_RESUME_WINDOW_BYTES,
        "resume-window",
        "bytes of each tailed channel's latest events kept to serve resumes without a store read (0: off)",
    )
    linger_s: float = _opt(
        DEFAULT_LINGER_S, "linger", "seconds a channel stays tailed after its last subscriber left, for quick resumes"
    )
    tail_stuck_after_s: float = _opt(
        0.0,
        "tail-stuck-after",
        "seconds the live tail may go without a round before /healthz fails (0: 2 x (tail-block + redis-timeout) + 10)",
    )
    max_connection_age_s: float = _opt(
        0.0,
        "max-connection-age",
        "seconds after which a stream is ended (0.8-1.0 of it, at random) so clients reconnect and rebalance (0: off)",
    )
    idempotency_window_s: float = _opt(
        DEFAULT_IDEMPOTENCY_WINDOW_S,
        "idempotency-window",
        "seconds a publish's Idempotency-Key is remembered (a retry within it appends nothing)",
    )
    embedded_worker: str = _opt(
        "auto", "embedded-worker", "run a generation worker in this process: auto (with the memory backend), on, off"
    )
    cancel_if_unwatched_s: float = _opt(
        0.0, "cancel-if-unwatched", "default seconds a generation may go unwatched before it is cancelled (0: off)"
    )
    providers_file: str | None = _opt(
        None,
        "providers-file",
        "named provider endpoints, JSON or YAML (docs/workers.md); the workers' file or all of them",
    )
    default_provider: str = _opt(
        "openai",
        "default-provider",
        "provider of a /v1/chat/completions model without one (`gpt-4o` rather than `openai/gpt-4o`)",
    )
    demo: bool = _opt(
        True, "demo", "offer the demo provider (no network; for trials): --no-demo refuses it, as production should"
    )
    # -- limits (see docs/security.md) --
    max_streams: int = _opt(10_000, "max-streams", "open streams this node serves; beyond: 503")
    backlog: int = _opt(4096, "backlog", "connections the kernel may queue before they are accepted (≤ somaxconn)")
    max_streams_per_client: int = _opt(64, "max-streams-per-client", "open streams per client (token or IP); 429")
    max_generations_per_client: int = _opt(
        16,
        "max-generations-per-client",
        "generations one client (token or IP) may have queued or running at once, over all nodes; 429 (0: no limit)",
    )
    publish_rate: float = _opt(500.0, "publish-rate", "events per second one publisher may append (token bucket)")
    publish_burst: int = _opt(1000, "publish-burst", "events one publisher may append at once (bucket size)")
    publish_bytes_rate: int = _opt(
        DEFAULT_PUBLISH_BYTES_RATE,
        "publish-bytes-rate",
        "request body bytes per second one publisher may send to publish or start generations (token bucket)",
    )
    publish_bytes_burst: int = _opt(
        DEFAULT_PUBLISH_BYTES_BURST,
        "publish-bytes-burst",
        "request body bytes one publisher may send at once (bucket size; at least --max-body and --max-job-bytes)",
    )
    max_job_bytes: int = _opt(
        DEFAULT_MAX_JOB_BYTES,
        "max-job-bytes",
        "largest generation request body accepted, in bytes (apart from --max-body)",
    )
    max_batch: int = _opt(1000, "max-batch", "events in one publish request")
    max_event_bytes: int = _opt(256 * 1024, "max-event-bytes", "bytes of one event's data")
    max_channel_len: int = _opt(200, "max-channel-len", "characters of a channel name (at most 200)")
    idle_timeout_s: float = _opt(
        60.0,
        "idle-timeout",
        "seconds a connection may take to send a complete request "
        "(idle keep-alive, headers dribbled in) before it is closed",
    )
    body_timeout_s: float = _opt(30.0, "body-timeout", "seconds a publish body may take to arrive; then 408")
    trusted_proxies: str = _opt(
        "", "trusted-proxies", "comma-separated proxy addresses/CIDRs whose X-Forwarded-For is believed"
    )
    # -- authentication (see docs/security.md) --
    anonymous: bool = _opt(False, "anonymous", "no authentication at all: every request may do everything (dev only)")
    jwt_secret: str | None = _opt(None, "jwt-secret", "HS256 secret of the JWTs this hub accepts", secret=True)
    jwt_public_key: str | None = _opt(None, "jwt-public-key", "PEM file with the RS256/ES256 public key of the JWTs")
    jwt_audience: str | None = _opt(None, "jwt-audience", "required `aud` of JWTs")
    jwt_issuer: str | None = _opt(None, "jwt-issuer", "required `iss` of JWTs")
    api_keys_file: str | None = _opt(None, "api-keys-file", "file of service API keys: `<key> <pattern>,<pattern>`")
    api_keys: str | None = _opt(None, "api-keys", "API keys inline, same format, entries separated by ';'", secret=True)
    auth_cookie: str = _opt("hub_token", "auth-cookie", "name of the cookie that may carry the JWT")
    cors_origins: str = _opt("", "cors-origins", "comma-separated origins allowed by CORS (exact), or *")

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"invalid setting {setting('HUB_', name)}: {what}")

        need(1 <= self.port <= 65535, "port", "must be 1-65535")
        # Braces would make a hash tag of the prefix: on a cluster every key would share one slot, or keys meant to
        # share one would not.
        need(not {"{", "}"} & set(self.key_prefix), "key-prefix", "must not contain { or }")
        if self.providers_file:
            try:
                load_provider_file(self.providers_file)  # every mistake in it, in one line, now
            except ProviderFileError as e:
                need(False, "providers-file", str(e))
        need(self.history >= 1, "history", "must be at least 1")
        need(self.ttl_s >= 1, "ttl", "must be at least 1 second")
        need(self.heartbeat_s > 0, "heartbeat", "must be positive")
        need(self.retry_ms >= 0, "retry-ms", "must not be negative")
        need(self.max_body_bytes >= 1024, "max-body", "must be at least 1024")
        need(self.log_level in _LOG_LEVELS, "log-level", f"must be one of {', '.join(_LOG_LEVELS)}")
        need(self.grace_s >= 0, "grace", "must not be negative")
        need(self.redis_timeout_s > 0, "redis-timeout", "must be positive")
        self.check_redis(need, redis_timeout_s=self.redis_timeout_s)
        need(self.max_buffer_bytes >= 4096, "max-buffer", "must be at least 4096")
        need(self.replay_page >= 1, "replay-page", "must be at least 1")
        need(0 < self.tail_block_s <= 60, "tail-block", "must be in (0, 60]")
        need(self.backlog >= 1, "backlog", "must be at least 1")
        need(self.resume_window_bytes >= 0, "resume-window", "must not be negative")
        need(0 <= self.linger_s <= 3600, "linger", "must be in [0, 3600]")
        need(
            self.tail_stuck_after_s == 0
            or self.tail_stuck_after_s > self.tail_block_s + self.redis_timeout_s + TAIL_BACKOFF_MAX_S,
            "tail-stuck-after",
            f"must be 0 (derived) or more than --tail-block + --redis-timeout + {TAIL_BACKOFF_MAX_S:g} "
            f"({self.tail_block_s + self.redis_timeout_s + TAIL_BACKOFF_MAX_S:g}), the longest a round of the live "
            "tail takes while Redis is down (a read that times out, then the pause before the next)",
        )
        need(
            self.max_connection_age_s == 0 or self.max_connection_age_s >= 1,
            "max-connection-age",
            "must be 0 (off) or at least 1 second",
        )
        need(1 <= self.idempotency_window_s <= 86_400, "idempotency-window", "must be 1-86400 seconds")
        need(self.embedded_worker in ("auto", "on", "off"), "embedded-worker", "must be auto, on or off")
        need(
            self.cancel_if_unwatched_s == 0 or 1 <= self.cancel_if_unwatched_s <= 86_400,
            "cancel-if-unwatched",
            "must be 0 (off) or 1-86400 seconds",
        )
        need(self.max_streams >= 1, "max-streams", "must be at least 1")
        need(self.idle_timeout_s > 0, "idle-timeout", "must be positive")
        need(self.body_timeout_s > 0, "body-timeout", "must be positive")
        need(self.max_streams_per_client >= 1, "max-streams-per-client", "must be at least 1")
        need(self.max_generations_per_client >= 0, "max-generations-per-client", "must not be negative (0: no limit)")
        need(self.publish_rate > 0, "publish-rate", "must be positive")
        need(self.publish_burst >= 1, "publish-burst", "must be at least 1")
        need(1 <= self.max_batch <= self.publish_burst, "max-batch", "must be 1 to --publish-burst")
        need(self.publish_bytes_rate >= 1, "publish-bytes-rate", "must be at least 1")
        need(self.max_job_bytes >= 1024, "max-job-bytes", "must be at least 1024")
        # As with --max-batch and --publish-burst: a body the hub accepts must fit an idle bucket, or it never passes.
        need(
            self.publish_bytes_burst >= max(self.max_body_bytes, self.max_job_bytes),
            "publish-bytes-burst",
            f"must be at least --max-body and --max-job-bytes ({max(self.max_body_bytes, self.max_job_bytes)})",
        )
        need(self.max_event_bytes >= 1024, "max-event-bytes", "must be at least 1024")
        need(1 <= self.max_channel_len <= 200, "max-channel-len", "must be 1-200")
        try:
            for part in self.trusted_proxies.split(","):
                if part.strip():
                    ipaddress.ip_network(part.strip(), strict=False)
        except ValueError:
            need(False, "trusted-proxies", "must be IP addresses or CIDR networks, comma-separated")
        has_credentials = bool(self.jwt_secret or self.jwt_public_key or self.api_keys_file or self.api_keys)
        need(
            self.anonymous or has_credentials,
            "anonymous",
            "authentication is on but no credentials are configured: give --jwt-secret, --jwt-public-key, "
            "--api-keys-file or --api-keys, or start with --anonymous for development",
        )
        need(
            not (self.jwt_secret and self.jwt_public_key),
            "jwt-secret",
            "give --jwt-secret or --jwt-public-key, not both",
        )
        need(self.jwt_secret is None or len(self.jwt_secret) >= 32, "jwt-secret", "must be at least 32 characters")

    @property
    def tail_stuck_bound_s(self) -> float:
        """How long the live tail may go without a round before liveness fails. One round is at most a read (up to
        tail-block, plus redis-timeout when Redis does not answer) and a back-off of up to TAIL_BACKOFF_MAX_S after a
        failure; twice that, and 10 s for a loaded event loop, is still a fraction of a minute."""
        if self.tail_stuck_after_s:
            return self.tail_stuck_after_s
        return 2 * (self.tail_block_s + self.redis_timeout_s) + 10.0

    @classmethod
    def from_args(cls, argv: Sequence[str] | None, environ: Mapping[str, str]) -> HubSettings:
        """Build settings from flags over `HUB_*` environment variables over defaults."""
        return settings_from_args(cls, "HUB_", "python -m hub", argv, environ)
