"""Fixtures: a real redis-server per test session, a backend per test (memory or Redis, unique key prefix), hub apps."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from hub.__main__ import create_node
from hub.settings import HubSettings
from ssecore.backend import Backend
from ssecore.backend_memory import MemoryBackend
from ssecore.backend_redis import RedisBackend
from tests.support import RedisClusterServers, RedisServer

BackendFactory = Callable[..., Backend]
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's alone, which it may stop, pause or restart."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def make_backend(backend_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    """Build backends of the parametrized kind; Redis ones share one server and get a key prefix unique to the test."""
    made: list[Backend] = []
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    server: RedisServer | RedisClusterServers | None = None
    if backend_kind == "redis":
        server = request.getfixturevalue("redis_server")
    elif backend_kind == "cluster":
        server = request.getfixturevalue("redis_cluster")

    def factory(*, history: int = 10_000, ttl_s: float = 3600.0, idempotency_window_s: float = 600.0) -> Backend:
        b: Backend
        if server is None:
            b = MemoryBackend(history=history, ttl_s=ttl_s, idempotency_window_s=idempotency_window_s)
        else:
            b = RedisBackend(
                server.url,
                prefix=prefix,
                history=history,
                ttl_s=ttl_s,
                timeout_s=2.0,
                idempotency_window_s=idempotency_window_s,
                cluster=backend_kind == "cluster",
            )
        made.append(b)
        return b

    yield factory
    for b in made:
        await b.aclose()


@pytest.fixture
def backend(make_backend: BackendFactory) -> Backend:
    return make_backend()


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    """Start a hub app on a test server, on a given backend (shared, so two apps can act as two nodes)."""

    async def factory(backend: Backend, **settings: Any) -> TestClient[Any, Any]:
        settings.setdefault("heartbeat_s", 30.0)
        settings.setdefault("anonymous", True)
        app = create_node(HubSettings(**settings), backend=backend)
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return factory


@pytest.fixture
async def client(make_client: ClientFactory, backend: Backend) -> TestClient[Any, Any]:
    return await make_client(backend)
