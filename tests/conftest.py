"""Fixtures: a real redis-server per test session, a backend per test (memory or Redis, unique key prefix), hub apps."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from hub.__main__ import create_node
from hub.settings import HubSettings
from producer.settings import ProducerSettings, ProviderKeys
from ssecore.backend import Backend
from ssecore.backend_memory import MemoryBackend
from ssecore.backend_redis import RedisBackend
from ssecore.jobs import JobQueue
from ssecore.presence import Presence
from tests.support import RedisClusterServers, RedisServer

BackendFactory = Callable[..., Backend]


class ClientFactory(Protocol):
    """`make_client`: a hub node (hub.__main__.create_node) on a test server. `settings` are HubSettings fields,
    over the tests' defaults (anonymous, a 30 s heartbeat); what is not given, the node makes as it would alone."""

    def __call__(
        self,
        backend: Backend | None = None,
        *,
        jobs: JobQueue | None = None,
        presence: Presence | None = None,
        worker_settings: ProducerSettings | None = None,
        provider_keys: ProviderKeys | None = None,
        registry: CollectorRegistry | None = None,
        **settings: Any,
    ) -> Awaitable[TestClient[Any, Any]]: ...


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
    """Start hub nodes on test servers, each closed at teardown. Nodes given the same backend (or the same Redis)
    act as two nodes of one deployment."""

    async def factory(
        backend: Backend | None = None,
        *,
        jobs: JobQueue | None = None,
        presence: Presence | None = None,
        worker_settings: ProducerSettings | None = None,
        provider_keys: ProviderKeys | None = None,
        registry: CollectorRegistry | None = None,
        **settings: Any,
    ) -> TestClient[Any, Any]:
        settings = {"heartbeat_s": 30.0, "anonymous": True, **settings}
        app = create_node(
            HubSettings(**settings),
            backend=backend,
            jobs=jobs,
            presence=presence,
            worker_settings=worker_settings,
            provider_keys=provider_keys,
            registry=registry,
        )
        client: TestClient[Any, Any] = await aiohttp_client(app)
        return client

    return factory


@pytest.fixture
async def client(make_client: ClientFactory, backend: Backend) -> TestClient[Any, Any]:
    return await make_client(backend)
