"""How every part of the project talks to Redis: one way to build a client, one way to make a call.

No automatic retries (a retried XADD after a lost reply would append twice), a bounded blocking pool (a burst waits
for a connection within the deadline instead of failing), and every failure of a call, error replies included, raised
as BackendUnavailable (a 503) with the Redis error as its cause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from .backend import BackendUnavailable

__all__ = [
    "ClusterGate",
    "RedisTarget",
    "client_kwargs",
    "connect",
    "parse_redis_url",
    "parse_sentinels",
    "redis_call",
    "redis_cluster_client",
]

T = TypeVar("T")


def parse_redis_url(url: str) -> dict[str, Any]:
    """The connection options of a Redis URL (host, port, db, ...), by the parser the clients use: the one place a URL
    is read, for the settings' check and for what is derived from it. Raises ValueError for a URL a client refuses."""
    return dict(parse_url(url))


def client_kwargs(timeout_s: float) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_connect_timeout": timeout_s,
        "socket_timeout": None,  # each call has its own deadline (redis_call); blocking reads set theirs
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """`host:port[,host:port...]` as (host, port) pairs; ValueError naming the first part that is not one."""
    pairs = []
    for part in text.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{part.strip()!r} is not host:port; give host:port[,host:port...]")
        pairs.append((host.strip("[]"), int(port)))  # [::1]:26379 names an IPv6 address
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is: a URL, or the primary that Sentinels name `master`, found anew on each new connection.

    With Sentinels the primary's address is asked for whenever a connection is opened, so after a failover the next
    connection goes to the promoted replica; connections to the old primary fail (or are refused as read-only) and
    are dropped. Database 0; `username` and `password` are the primary's and its replicas', `sentinel_username` and
    `sentinel_password` the Sentinels' own (None: they take none). The TLS files serve every TLS connection: of a
    rediss:// URL, or with Sentinels and `tls`, to the Sentinels and to the primary alike.
    """

    url: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    password: str | None = field(default=None, repr=False)
    username: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False  # the Sentinel form's TLS, to the Sentinels and to the primary (a URL says so by rediss://)
    tls_ca_file: str | None = None  # None: the system's CAs
    tls_cert_file: str | None = None  # with tls_key_file: a client certificate, for servers that ask for one
    tls_key_file: str | None = None

    @classmethod
    def of(cls, where: str | RedisTarget) -> RedisTarget:
        return where if isinstance(where, RedisTarget) else cls(url=where)

    @property
    def db(self) -> int:
        return int(parse_redis_url(self.url).get("db") or 0) if self.url else 0

    def __repr__(self) -> str:
        return f"RedisTarget({self.describe()})"  # a URL may hold a password: never shown

    def describe(self) -> str:
        """For the log, without a password."""
        if not self.url:
            where = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"Sentinel master {self.master!r} at {where}" + (" over TLS" if self.tls else "")
        scheme, sep, rest = self.url.partition("://")
        if "@" in rest:
            rest = "***@" + rest.rsplit("@", 1)[1]
        return scheme + sep + rest

    def client(self, *, timeout_s: float, max_connections: int) -> Any:
        """A client that owns a blocking pool of at most `max_connections` (typed Any: redis-py's stubs do not model
        decode_responses=True). Closing it closes its pool, and with Sentinels, the connections to them too."""
        if self.url:
            pool = BlockingConnectionPool.from_url(
                self.url,
                max_connections=max_connections,
                timeout=timeout_s,
                **client_kwargs(timeout_s),
                **self.tls_kwargs(),
            )
            return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections
        # Every Sentinel question has a deadline of its own: a Sentinel that stopped answering is skipped for the next.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            self.sentinels,
            sentinel_kwargs={
                "socket_connect_timeout": timeout_s,
                "socket_timeout": timeout_s,
                "username": self.sentinel_username,
                "password": self.sentinel_password,
                **self.tls_kwargs(),
            },
            username=self.username,
            password=self.password,
            **client_kwargs(timeout_s),
            **self.tls_kwargs(),
        )
        return sentinel.master_for(
            self.master,
            redis_class=_SentinelRedis,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=max_connections,
            timeout=timeout_s,
        )

    def pubsub(self, client: Any, **kwargs: Any) -> Any:
        """A PubSub on a connection of its own to the Redis that `client` (one of `client()`) talks to, with `kwargs`
        over the connection options."""
        if self.url:
            url_client = aioredis.Redis.from_url(self.url, single_connection_client=True, **self.tls_kwargs(), **kwargs)
            return url_client.pubsub()
        # The same Sentinels as `client`'s (closed with it): asked for the primary whenever the PubSub reconnects.
        sentinel: Sentinel = client.connection_pool.sentinel_manager
        return sentinel.master_for(self.master, **kwargs).pubsub()

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's TLS options of a connection: none without TLS. The server's certificate is checked against the
        CA file (else the system's CAs) and its host name or IP address; `ssl` is what turns TLS on where no rediss://
        URL does (the Sentinel form)."""
        if not (self.url.startswith("rediss://") if self.url else self.tls):
            return {}
        files = {"ssl_ca_certs": self.tls_ca_file, "ssl_certfile": self.tls_cert_file, "ssl_keyfile": self.tls_key_file}
        return {**({} if self.url else {"ssl": True}), **{k: v for k, v in files.items() if v is not None}}


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The primary's pool waits for a free connection within the deadline, as the URL form's does, where redis-py's
    Sentinel pool would refuse at once."""


class _SentinelRedis(aioredis.Redis):
    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool: Any = self.connection_pool  # a _BlockingSentinelPool
        await pool.sentinel_manager.aclose()


class ClusterGate:
    """What a Redis Cluster client needs around each call, that the single-node pool does by itself.

    Calls that start together before the client knows the slot map each set out to learn it and close one another's
    connections doing so: the first learns it, the others wait for it. And the client fails a call at once when a
    node's connections are all busy, where the single-node pool waits: calls wait here instead, so a burst is queued
    within its deadline, not refused.
    """

    def __init__(self, client: Any, max_connections: int) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(max_connections)
        self._mapping = asyncio.Lock()
        self._mapped = False

    async def run(self, call: Awaitable[T]) -> T:
        if not self._mapped:
            async with self._mapping:
                if not self._mapped:
                    await self._client.initialize()
                    self._mapped = True
        async with self._slots:
            return await call


def redis_cluster_client(url: str | RedisTarget, *, timeout_s: float, max_connections: int) -> tuple[Any, ClusterGate]:
    """A Redis Cluster client from the URL of any of its nodes (it learns the others and follows the slot map), and
    the gate its calls go through (`redis_call(..., gate=)`). Redirections (MOVED, ASK) are followed, since the command
    did not run; nothing is retried after a connection error, for the same reason as above.
    """
    target = RedisTarget.of(url)
    client = RedisCluster.from_url(
        target.url, max_connections=max_connections, **client_kwargs(timeout_s), **target.tls_kwargs()
    )
    return client, ClusterGate(client, max_connections)


def connect(
    url: str | RedisTarget, *, cluster: bool, timeout_s: float, max_connections: int
) -> tuple[Any, ClusterGate | None]:
    """A client of a single Redis (by URL or Sentinels) or of a Redis Cluster, and the gate its calls go through
    (None: single Redis)."""
    target = RedisTarget.of(url)
    if cluster:
        assert target.url, "a Redis Cluster is given by the URL of a node (the settings check it)"
        return redis_cluster_client(target, timeout_s=timeout_s, max_connections=max_connections)
    return target.client(timeout_s=timeout_s, max_connections=max_connections), None


async def redis_call(call: Awaitable[T], timeout_s: float, gate: ClusterGate | None = None) -> T:
    """Await one Redis call within `timeout_s`; any failure becomes BackendUnavailable (cause: the Redis error)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await (call if gate is None else gate.run(call))
    except ResponseError as e:
        raise BackendUnavailable(f"redis error: {str(e).split(' ', 1)[0]}") from e
    except (RedisError, RedisClusterException, TimeoutError, OSError) as e:
        # RedisClusterException (no node of the cluster reachable, a slot not covered) is not a RedisError.
        raise BackendUnavailable(f"redis unavailable: {type(e).__name__}") from e
