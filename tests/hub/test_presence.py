"""Presence on both implementations: when a channel was last watched on any node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection

import pytest

from ssecore.backend_memory import MemoryBackend
from ssecore.presence import MemoryPresence, Presence, RedisPresence
from tests.conftest import ClientFactory
from tests.hub.test_api import subscribe
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


class _FailsOnce(MemoryPresence):
    """The in-process presence, except that its first report fails with an error nobody planned for."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def touch(self, channels: Collection[str]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("an unexpected failure")
        await super().touch(channels)


async def test_a_node_goes_on_reporting_presence_after_an_unexpected_error(make_client: ClientFactory) -> None:
    """Were the presence loop to die, workers would cancel generations that are watched as unwatched, and nothing
    would show it. It outlives the error, and it answers to /healthz like the live tail."""
    presence = _FailsOnce()
    node = await make_client(MemoryBackend(history=100, ttl_s=60), presence=presence)
    body = await (await node.get("/healthz")).json()
    assert {"presence", "heartbeat"} <= set(body["loops"])
    live = await subscribe(node, "c")
    deadline = time.monotonic() + 15
    while "c" not in await presence.last_seen(["c"]):
        assert time.monotonic() < deadline, "the presence loop stopped reporting"
        await asyncio.sleep(0.1)
    assert presence.failed
    live.close()
