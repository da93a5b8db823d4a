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
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from .backend import BackendUnavailable

__all__ = ["client_kwargs", "redis_call", "redis_client"]

T = TypeVar("T")


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


async def redis_call(call: Awaitable[T], timeout_s: float) -> T:
    """Await one Redis call within `timeout_s`; any failure becomes BackendUnavailable (cause: the Redis error)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await call
    except ResponseError as e:
        raise BackendUnavailable(f"redis error: {str(e).split(' ', 1)[0]}") from e
    except (RedisError, TimeoutError, OSError) as e:
        raise BackendUnavailable(f"redis unavailable: {type(e).__name__}") from e
