"""Fixtures of the scale-out tests: a cluster (hub nodes, worker, nginx) per test, a client session without a
connection limit, and a JSON file of the figures the tests measure."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.scaleout.cluster import Cluster, find_nginx
from tests.support import RedisServer

ClusterFactory = Callable[..., Awaitable[Cluster]]
Record = Callable[[str, dict[str, Any]], None]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if find_nginx() is None:
        skip = pytest.mark.skip(reason="nginx is not installed (make test installs it)")
        for item in items:
            if "make_cluster" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # Hundreds of streams at once: no per-host connection limit.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@pytest.fixture
async def make_cluster(redis_server: RedisServer) -> AsyncIterator[ClusterFactory]:
    """Start a cluster (`make_cluster(tokens_per_s=...)`); every process it started is ended at teardown."""
    made: list[Cluster] = []

    async def make(**kw: Any) -> Cluster:
        c = Cluster(redis_server, **kw)
        made.append(c)
        c.start()
        return c

    try:
        yield make
    finally:
        for c in made:
            await c.aclose()


@pytest.fixture(scope="session")
def figures_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.getbasetemp() / "scaleout-figures.json"
    yield path
    if path.exists():
        print(f"\nscale-out figures: {path}")


@pytest.fixture
def record(figures_path: Path) -> Record:
    """Print a test's measured figures (pytest -s shows them) and add them to the session's JSON file."""

    def write(name: str, values: dict[str, Any]) -> None:
        print(f"\n{name}: {json.dumps(values, indent=1)}")
        data = json.loads(figures_path.read_text()) if figures_path.exists() else {}
        data[name] = values
        figures_path.write_text(json.dumps(data, indent=2) + "\n")

    return write
