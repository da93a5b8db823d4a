"""Presence on both implementations: when a channel was last watched on any node."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from hub.presence import MemoryPresence, Presence, RedisPresence
from tests.support import RedisServer


@pytest.fixture(params=["memory", "redis"])
async def presence(request: pytest.FixtureRequest) -> AsyncIterator[Presence]:
    p: Presence
    if request.param == "memory":
        p = MemoryPresence()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        p = RedisPresence(server.url, prefix=f"presence{time.monotonic_ns()}:")
    yield p
    await p.aclose()


async def test_reported_channels_are_seen_and_others_are_not(presence: Presence) -> None:
    before = time.time()
    await presence.touch(["a", "b"])
    seen = await presence.last_seen(["a", "b", "never"])
    assert set(seen) == {"a", "b"} and all(before - 1 <= t <= time.time() + 1 for t in seen.values())
    first = seen["a"]
    await presence.touch(["a"])
    assert (await presence.last_seen(["a"]))["a"] >= first
    assert await presence.last_seen([]) == {}
    await presence.touch([])  # a node with no subscribers reports nothing, and that is fine
