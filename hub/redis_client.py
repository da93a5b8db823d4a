"""How every part of the project talks to Redis: one way to build a client, one way to make a call.

No automatic retries (a retried XADD after a lost reply would append twice), a bounded blocking pool (a burst waits
for a connection within the deadline instead of failing), and every failure of a call, error replies included, raised
as BackendUnavailable (a 503) with the Redis error as its cause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from .backend import BackendUnavailable

__all__ = [
    "ClusterGate",
    "client_kwargs",
    "connect",
    "parse_redis_url",
    "redis_call",
    "redis_client",
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


def redis_client(url: str, *, timeout_s: float, max_connections: int) -> Any:
    """A client that owns a blocking pool of at most `max_connections` (typed Any: redis-py's stubs do not model
    decode_responses=True)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s, **client_kwargs(timeout_s)
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


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


def redis_cluster_client(url: str, *, timeout_s: float, max_connections: int) -> tuple[Any, ClusterGate]:
    """A Redis Cluster client from the URL of any of its nodes (it learns the others and follows the slot map), and
    the gate its calls go through (`redis_call(..., gate=)`). Redirections (MOVED, ASK) are followed, since the command
    did not run; nothing is retried after a connection error, for the same reason as above.
    """
    client = RedisCluster.from_url(url, max_connections=max_connections, **client_kwargs(timeout_s))
    return client, ClusterGate(client, max_connections)


def connect(url: str, *, cluster: bool, timeout_s: float, max_connections: int) -> tuple[Any, ClusterGate | None]:
    """A client of a single Redis or of a Redis Cluster, and the gate its calls go through (None: single Redis)."""
    if cluster:
        return redis_cluster_client(url, timeout_s=timeout_s, max_connections=max_connections)
    return redis_client(url, timeout_s=timeout_s, max_connections=max_connections), None


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
