"""What the hub's and the worker's settings are built with: flags over environment variables over defaults, the
settings both take alike (where Redis is, and how durable a write must be), and their checks.

Each process keeps every one of its settings in one frozen dataclass (hub.settings.HubSettings,
producer.settings.ProducerSettings) whose fields carry their flag and help (`opt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .redis_client import RedisTarget, parse_redis_url, parse_sentinels
from .startup import setting

__all__ = [
    "DEFAULT_HISTORY",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_REPLICAS_TIMEOUT_S",
    "DEFAULT_TTL_S",
    "RedisSettings",
    "check_replicas",
    "opt",
    "redis_target",
    "redis_url_problem",
    "settings_from_args",
]

# Shared by the hub and its workers, which must agree on them.
DEFAULT_HISTORY = 10_000
DEFAULT_TTL_S = 86_400.0
DEFAULT_KEY_PREFIX = "hub:"
# Replicas on the same network confirm a write within a millisecond or two; a second is a replica that is down or far
# behind, and the answer should say so rather than make the publisher wait longer.
DEFAULT_REPLICAS_TIMEOUT_S = 1.0


def opt(default: Any, flag: str, help: str, *, secret: bool = False) -> Any:
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
class RedisSettings:
    """Where Redis is and how durable a write must be: settings a hub node and its workers take alike, each process's
    settings class extending this one (with its own `ENV_PREFIX`)."""

    ENV_PREFIX: ClassVar[str] = ""

    # Secret: a URL may carry the password.
    redis_url: str | None = opt(
        None, "redis-url", "Redis URL (redis://host:6379/0); a hub without one runs on its memory backend", secret=True
    )
    redis_cluster: bool = opt(
        False, "redis-cluster", "--redis-url is a node of a Redis Cluster: spread channels over its slots"
    )
    redis_sentinels: str | None = opt(
        None, "redis-sentinels", "Sentinels (host:port,host:port,...) naming the Redis primary, instead of --redis-url"
    )
    redis_sentinel_master: str | None = opt(None, "redis-sentinel-master", "name of the master the Sentinels watch")
    redis_password: str | None = opt(
        None, "redis-password", "password of the primary and replicas named by Sentinels", secret=True
    )
    redis_username: str | None = opt(
        None, "redis-username", "ACL user of the primary and replicas named by Sentinels (default: the default user)"
    )
    redis_sentinel_username: str | None = opt(None, "redis-sentinel-username", "ACL user of the Sentinels")
    redis_sentinel_password: str | None = opt(
        None, "redis-sentinel-password", "password of the Sentinels (their requirepass)", secret=True
    )
    redis_tls: bool = opt(
        False, "redis-tls", "TLS to the Sentinels and to the primary and replicas they name (a URL says rediss://)"
    )
    redis_tls_ca_file: str | None = opt(
        None,
        "redis-tls-ca-file",
        "PEM file of the CAs that Redis's certificates are checked against (default: system's)",
    )
    redis_tls_cert_file: str | None = opt(
        None, "redis-tls-cert-file", "PEM file of this process's client certificate, for Redis that asks for one"
    )
    redis_tls_key_file: str | None = opt(None, "redis-tls-key-file", "PEM file of that certificate's private key")
    publish_replicas: int = opt(
        0,
        "publish-replicas",
        "replicas that must hold each publish, append and submitted generation before it counts (0: the primary alone)",
    )
    publish_replicas_timeout_s: float = opt(
        DEFAULT_REPLICAS_TIMEOUT_S,
        "publish-replicas-timeout",
        "seconds to wait for them, then answer 503 not_replicated (a worker's run fails over)",
    )

    @property
    def redis_target(self) -> RedisTarget | None:
        """Where Redis is (None: none given)."""
        return redis_target(
            self.ENV_PREFIX,
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

    def check_redis(self, need: Callable[[bool, str, str], None], *, redis_timeout_s: float) -> None:
        """The checks of these settings, for the process's own `__post_init__` (`need` raises, naming the setting)."""
        need(not self.redis_cluster or self.redis_url is not None, "redis-cluster", "needs --redis-url of a node")
        need(
            not (self.redis_cluster and self.redis_sentinels), "redis-cluster", "cannot be used with --redis-sentinels"
        )
        check_replicas(
            need,
            self.publish_replicas,
            self.publish_replicas_timeout_s,
            redis_timeout_s=redis_timeout_s,
            redis=self.redis_url is not None or self.redis_sentinels is not None,
            cluster=self.redis_cluster,
        )
        self.redis_target  # validates where Redis is  # noqa: B018


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
