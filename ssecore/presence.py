"""Presence: when each channel last had a subscriber on any node, so a worker can stop generations nobody watches.

Each hub node reports the channels it serves every few seconds (one command); workers ask about the channels of their
running generations (one command). `MemoryPresence` for one process, `RedisPresence` (one sorted set) for many.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from .redis_client import RedisTarget, connect, redis_call
from .rediskeys import RedisKeys

__all__ = ["PRESENCE_INTERVAL_S", "PRESENCE_SLACK_S", "MemoryPresence", "Presence", "RedisPresence"]

# Nodes report every PRESENCE_INTERVAL_S; a channel counts as unwatched only once it missed reports for longer than
# PRESENCE_SLACK_S beyond a job's limit, so a watched channel is never taken for an abandoned one between reports.
PRESENCE_INTERVAL_S = 1.0
PRESENCE_SLACK_S = 2.0

# Entries older than this are dropped when a node reports, so the set stays the size of what is being watched.
_FORGET_AFTER_S = 3600.0


class Presence(Protocol):
    async def touch(self, channels: Collection[str]) -> None:
        """These channels have subscribers now."""
        ...

    async def last_seen(self, channels: Sequence[str]) -> dict[str, float]:
        """When each channel last had a subscriber (epoch seconds); absent if not within the last hour."""
        ...

    async def aclose(self) -> None: ...


class MemoryPresence:
    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    async def touch(self, channels: Collection[str]) -> None:
        now = time.time()
        for ch in channels:
            self._seen[ch] = now
        if len(self._seen) > 2 * len(channels) + 1000:
            cutoff = now - _FORGET_AFTER_S
            self._seen = {ch: t for ch, t in self._seen.items() if t >= cutoff}

    async def last_seen(self, channels: Sequence[str]) -> dict[str, float]:
        return {ch: self._seen[ch] for ch in channels if ch in self._seen}

    async def aclose(self) -> None:
        return None


class RedisPresence:
    def __init__(self, url: str | RedisTarget, *, prefix: str, timeout_s: float = 3.0, cluster: bool = False) -> None:
        self._key = RedisKeys(prefix).watched
        self._timeout_s = timeout_s
        self._redis, self._gate = connect(url, cluster=cluster, timeout_s=timeout_s, max_connections=4)

    async def _call(self, coro: Any) -> Any:
        return await redis_call(coro, self._timeout_s, self._gate)

    async def touch(self, channels: Collection[str]) -> None:
        now = time.time()
        pipe = self._redis.pipeline(transaction=False)
        if channels:
            pipe.zadd(self._key, dict.fromkeys(channels, now))
        pipe.zremrangebyscore(self._key, "-inf", now - _FORGET_AFTER_S)
        await self._call(pipe.execute())

    async def last_seen(self, channels: Sequence[str]) -> dict[str, float]:
        if not channels:
            return {}
        scores = await self._call(self._redis.zmscore(self._key, list(channels)))
        return {ch: float(s) for ch, s in zip(channels, scores, strict=True) if s is not None}

    async def aclose(self) -> None:
        await self._redis.aclose()
