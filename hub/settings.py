"""HubSettings: every setting of a hub node in one frozen dataclass, with its flag, environment variable and default.

`--name` on the command line, `HUB_NAME` in the environment (flags win). Validated at construction, so a bad value
stops the process at start with a message naming the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .backend import DEFAULT_IDEMPOTENCY_WINDOW_S
from .redis_client import RedisTarget, parse_redis_url, parse_sentinels
from .startup import setting

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
DEFAULT_HISTORY = 10_000
DEFAULT_TTL_S = 86_400.0
DEFAULT_HEARTBEAT_S = 15.0
DEFAULT_RETRY_MS = 2_000
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_GRACE_S = 10.0
DEFAULT_KEY_PREFIX = "hub:"
DEFAULT_REDIS_TIMEOUT_S = 3.0
# Replicas on the same network confirm a write within a millisecond or two; a second is a replica that is down or far
# behind, and the answer should say so rather than make the publisher wait longer.
DEFAULT_REPLICAS_TIMEOUT_S = 1.0
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


def _opt(default: Any, flag: str, help: str, *, secret: bool = False) -> Any:
    # Secrets stay out of repr(), so a logged settings object never shows them.
    return field(default=default, repr=not secret, metadata={"flag": flag, "help": help})


def redis_url_problem(url: str) -> str:
    """What is wrong with a Redis URL, or "" when a client can be built from it (the hub's and the worker's check)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "must start with redis://, rediss:// or unix://"
    try:
        parse_redis_url(url)
    except ValueError as e:  # a port that is not a number, a database that is not one, an option of the wrong type
        return f"{e}; give a URL such as redis://host:6379/0"
    return ""


def redis_target(
    env_prefix: str,
    *,
    url: str | None,
    sentinels: str | None,
    master: str | None,
    password: str | None,
    username: str | None = None,
    sentinel_username: str | None = None,
    sentinel_password: str | None = None,
    tls: bool = False,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
) -> RedisTarget | None:
    """Where Redis is, from the hub's or the worker's settings: a URL, or Sentinels and the name of their master
    (exactly one of the two), or None for no Redis. ValueError naming the setting to change."""

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"invalid setting {setting(env_prefix, name)}: {what}")

    need(
        url is None or sentinels is None,
        "redis-sentinels",
        f"give either {setting(env_prefix, 'redis-url')} or Sentinels (with "
        f"{setting(env_prefix, 'redis-sentinel-master')}), not both",
    )
    if url is not None:
        url_problem = redis_url_problem(url)
        need(not url_problem, "redis-url", url_problem)
        need(password is None, "redis-password", "is for Sentinels only: with --redis-url, put the password in the URL")
        need(username is None, "redis-username", "is for Sentinels only: with --redis-url, put the user in the URL")
        need(not tls or url.startswith("rediss://"), "redis-tls", "with --redis-url, TLS is a rediss:// URL: give one")
        for name, value in (
            ("redis-sentinel-master", master),
            ("redis-sentinel-username", sentinel_username),
            ("redis-sentinel-password", sentinel_password),
        ):
            need(value is None, name, "needs --redis-sentinels (and no --redis-url)")
        tls_on, no_tls = url.startswith("rediss://"), "needs TLS: a rediss:// URL in --redis-url"
        target = RedisTarget(url=url, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file, tls_key_file=tls_key_file)
    elif sentinels is None:
        for name, given in (
            ("redis-sentinel-master", master is not None),
            ("redis-password", password is not None),
            ("redis-username", username is not None),
            ("redis-sentinel-username", sentinel_username is not None),
            ("redis-sentinel-password", sentinel_password is not None),
            ("redis-tls", tls),
        ):
            need(not given, name, "needs --redis-sentinels")
        tls_on, no_tls = False, "needs TLS to Redis: a rediss:// --redis-url, or --redis-sentinels with --redis-tls"
        target = None
    else:
        try:
            pairs = parse_sentinels(sentinels)
        except ValueError as e:
            need(False, "redis-sentinels", str(e))
        need(bool(master), "redis-sentinel-master", "must name the master that --redis-sentinels watch")
        assert master is not None
        tls_on, no_tls = tls, "needs --redis-tls (TLS to the Sentinels and to the primary)"
        target = RedisTarget(
            sentinels=pairs,
            master=master,
            password=password,
            username=username,
            sentinel_username=sentinel_username,
            sentinel_password=sentinel_password,
            tls=tls,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
        )
    for name, path in (
        ("redis-tls-ca-file", tls_ca_file),
        ("redis-tls-cert-file", tls_cert_file),
        ("redis-tls-key-file", tls_key_file),
    ):
        need(path is None or tls_on, name, no_tls)
    need(tls_key_file is None or tls_cert_file is not None, "redis-tls-key-file", "needs --redis-tls-cert-file")
    need(tls_cert_file is None or tls_key_file is not None, "redis-tls-cert-file", "needs --redis-tls-key-file")
    problem = _tls_files_problem(tls_ca_file, tls_cert_file, tls_key_file)
    if problem is not None:
        need(False, *problem)
    return target


def _tls_files_problem(ca_file: str | None, cert_file: str | None, key_file: str | None) -> tuple[str, str] | None:
    """The setting whose TLS file cannot serve, and why; None when all serve. Checked at start, so that a typo or a
    wrong file stops the process in one line instead of failing every connection to Redis."""
    for name, path in (
        ("redis-tls-ca-file", ca_file),
        ("redis-tls-cert-file", cert_file),
        ("redis-tls-key-file", key_file),
    ):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            return name, f"cannot read {path} ({e.strerror or type(e).__name__}); give a file this process can read"
    context = ssl.create_default_context()
    for name, path in (("redis-tls-ca-file", ca_file), ("redis-tls-cert-file", cert_file)):
        try:
            if path is not None:
                context.load_verify_locations(cafile=path)
        except ssl.SSLError as e:
            return name, f"{path} holds no PEM certificate ({e.reason or e})"
    if cert_file is not None and key_file is not None:
        try:
            # An encrypted key is refused here (the password callback gives none), rather than making the TLS
            # library ask for its password on a terminal at the first connection.
            context.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except ssl.SSLError as e:
            return "redis-tls-key-file", (
                f"{key_file} is not the unencrypted PEM private key of the certificate in {cert_file} ({e.reason or e})"
            )
    return None


def check_replicas(
    need: Callable[[bool, str, str], None],
    replicas: int,
    timeout_s: float,
    *,
    redis_timeout_s: float,
    redis: bool,
    cluster: bool,
) -> None:
    """The checks of --publish-replicas and its timeout, the hub's and the worker's."""
    need(0 <= replicas <= 16, "publish-replicas", "must be 0-16")
    need(timeout_s > 0, "publish-replicas-timeout", "must be positive")
    if replicas:
        need(redis, "publish-replicas", "needs Redis (--redis-url or --redis-sentinels): the memory backend has none")
        need(not cluster, "publish-replicas", "is not supported with --redis-cluster")
        # WAIT holds its connection for up to the timeout: within one call's deadline, or every wait would fail it.
        need(
            timeout_s < redis_timeout_s,
            "publish-replicas-timeout",
            f"must be less than the Redis call deadline ({redis_timeout_s:g} s)",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HubSettings:
    host: str = _opt(DEFAULT_HOST, "host", "address to listen on")
    port: int = _opt(DEFAULT_PORT, "port", "TCP port to listen on")
    # Secret: a URL may carry the password.
    redis_url: str | None = _opt(
        None, "redis-url", "Redis URL (redis://host:6379/0); absent: embedded memory backend", secret=True
    )
    redis_cluster: bool = _opt(
        False, "redis-cluster", "--redis-url is a node of a Redis Cluster: spread channels over its slots"
    )
    redis_sentinels: str | None = _opt(
        None,
        "redis-sentinels",
        "Sentinels (host:port,host:port,...) naming the Redis primary, instead of --redis-url",
    )
    redis_sentinel_master: str | None = _opt(None, "redis-sentinel-master", "name of the master the Sentinels watch")
    redis_password: str | None = _opt(
        None, "redis-password", "password of the primary and replicas named by Sentinels", secret=True
    )
    redis_username: str | None = _opt(
        None, "redis-username", "ACL user of the primary and replicas named by Sentinels (default: the default user)"
    )
    redis_sentinel_username: str | None = _opt(None, "redis-sentinel-username", "ACL user of the Sentinels")
    redis_sentinel_password: str | None = _opt(
        None, "redis-sentinel-password", "password of the Sentinels (their requirepass)", secret=True
    )
    redis_tls: bool = _opt(
        False, "redis-tls", "TLS to the Sentinels and to the primary and replicas they name (a URL says rediss://)"
    )
    redis_tls_ca_file: str | None = _opt(
        None,
        "redis-tls-ca-file",
        "PEM file of the CAs that Redis's certificates are checked against (default: system's)",
    )
    redis_tls_cert_file: str | None = _opt(
        None, "redis-tls-cert-file", "PEM file of this process's client certificate, for Redis that asks for one"
    )
    redis_tls_key_file: str | None = _opt(None, "redis-tls-key-file", "PEM file of that certificate's private key")
    key_prefix: str = _opt(DEFAULT_KEY_PREFIX, "key-prefix", "prefix of every Redis key this hub uses")
    history: int = _opt(DEFAULT_HISTORY, "history", "events kept per channel (approximately, like MAXLEN ~)")
    ttl_s: float = _opt(DEFAULT_TTL_S, "ttl", "seconds a channel lives after its last publish")
    heartbeat_s: float = _opt(DEFAULT_HEARTBEAT_S, "heartbeat", "seconds between keep-alive comments")
    retry_ms: int = _opt(DEFAULT_RETRY_MS, "retry-ms", "reconnection delay hint sent to clients (retry:)")
    max_body_bytes: int = _opt(DEFAULT_MAX_BODY_BYTES, "max-body", "largest publish body accepted, in bytes")
    log_level: str = _opt("info", "log-level", "debug, info, warning or error")
    grace_s: float = _opt(DEFAULT_GRACE_S, "grace", "seconds a shutdown may take before streams are cut")
    redis_timeout_s: float = _opt(DEFAULT_REDIS_TIMEOUT_S, "redis-timeout", "deadline of one Redis call, seconds")
    publish_replicas: int = _opt(
        0,
        "publish-replicas",
        "replicas that must hold each publish and submitted generation before it is answered (0: the primary alone)",
    )
    publish_replicas_timeout_s: float = _opt(
        DEFAULT_REPLICAS_TIMEOUT_S,
        "publish-replicas-timeout",
        "seconds to wait for them, then answer 503 not_replicated",
    )
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
        need(self.history >= 1, "history", "must be at least 1")
        need(self.ttl_s >= 1, "ttl", "must be at least 1 second")
        need(self.heartbeat_s > 0, "heartbeat", "must be positive")
        need(self.retry_ms >= 0, "retry-ms", "must not be negative")
        need(self.max_body_bytes >= 1024, "max-body", "must be at least 1024")
        need(self.log_level in _LOG_LEVELS, "log-level", f"must be one of {', '.join(_LOG_LEVELS)}")
        need(self.grace_s >= 0, "grace", "must not be negative")
        need(self.redis_timeout_s > 0, "redis-timeout", "must be positive")
        check_replicas(
            need,
            self.publish_replicas,
            self.publish_replicas_timeout_s,
            redis_timeout_s=self.redis_timeout_s,
            redis=self.redis_url is not None or self.redis_sentinels is not None,
            cluster=self.redis_cluster,
        )
        need(not self.redis_cluster or self.redis_url is not None, "redis-cluster", "needs --redis-url of a node")
        need(
            not (self.redis_cluster and self.redis_sentinels), "redis-cluster", "cannot be used with --redis-sentinels"
        )
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
        self.redis_target  # validates the Redis settings  # noqa: B018

    @property
    def redis_target(self) -> RedisTarget | None:
        """Where Redis is (None: the embedded memory backend)."""
        return redis_target(
            "HUB_",
            url=self.redis_url,
            sentinels=self.redis_sentinels,
            master=self.redis_sentinel_master,
            password=self.redis_password,
            username=self.redis_username,
            sentinel_username=self.redis_sentinel_username,
            sentinel_password=self.redis_sentinel_password,
            tls=self.redis_tls,
            tls_ca_file=self.redis_tls_ca_file,
            tls_cert_file=self.redis_tls_cert_file,
            tls_key_file=self.redis_tls_key_file,
        )

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


T = TypeVar("T")


def settings_from_args(
    cls: type[T], env_prefix: str, prog: str, argv: Sequence[str] | None, environ: Mapping[str, str]
) -> T:
    """Build a settings dataclass whose fields carry `flag` and `help` metadata: flags, then environment, then
    defaults."""
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    envs = {f.name: env_prefix + f.metadata["flag"].upper().replace("-", "_") for f in fields}
    parser = argparse.ArgumentParser(prog=prog)
    for f in fields:
        help_text = f"{f.metadata['help']} [{envs[f.name]}]"
        if f.type in ("bool", bool):
            # --name and --no-name: a setting that is on by default can be switched off on the command line too.
            parser.add_argument(
                f"--{f.metadata['flag']}",
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(f"--{f.metadata['flag']}", dest=f.name, default=None, help=help_text)
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields:
        raw = getattr(ns, f.name)
        if raw is None:
            raw = environ.get(envs[f.name])
        if raw is None or raw == "":
            continue
        values[f.name] = _convert(f, raw, envs[f.name])
    return cls(**values)


def _convert(f: dataclasses.Field[Any], raw: str | bool, env: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"invalid setting {f.metadata['flag']} ({env}): {raw!r} is not true or false")
    assert isinstance(raw, str)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        hint = ""
        if raw.startswith(("tcp://", "udp://")):
            # Kubernetes sets <SERVICE>_PORT=tcp://<ip>:<port> for every Service in the namespace: a Service named
            # `hub` (or `producer-metrics`, ...) lands on one of our settings.
            hint = (
                " (a Kubernetes service link: a Service's name makes this variable; set enableServiceLinks: false "
                "in the pod spec, or rename the Service)"
            )
        raise ValueError(f"invalid setting {f.metadata['flag']} ({env}): {raw!r} is not a number{hint}") from None
    return raw
