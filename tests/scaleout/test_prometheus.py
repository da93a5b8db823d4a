"""A real Prometheus (Debian's `prometheus` binary) scraping two hub nodes: the open-stream gauge and the delivery
and publish counters come back from its query API with exactly what the test did on each node, and summed."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.processes import stop_process
from tests.support import HubProcess, RedisServer, collect, free_port, wait_http_ok

_PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.skipif(_PROMETHEUS is None, reason="prometheus is not installed (make test installs it)"),
    pytest.mark.e2e,
    pytest.mark.slow,
]


class PrometheusServer:
    """Prometheus on a free loopback port, scraping `targets` every second, its storage in a directory of its own."""

    def __init__(self, targets: list[str]) -> None:
        assert _PROMETHEUS is not None
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hub-test-prometheus-"))
        listed = ", ".join(f"'{t}'" for t in targets)
        (self.dir / "prometheus.yml").write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: hub\n"
            f"    static_configs:\n      - targets: [{listed}]\n"
        )
        self.args = [
            _PROMETHEUS,
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float = 30) -> None:
        await wait_http_ok(session, f"{self.url}/-/ready", timeout_s=timeout_s, why=self.log)

    async def query(self, session: aiohttp.ClientSession, expr: str) -> dict[str, float]:
        """An instant query's vector, as {instance (or "" for an aggregate): value}."""
        async with session.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
            body = await resp.json()
        assert resp.status == 200 and body["status"] == "success", body
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in body["data"]["result"]}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[list[HubProcess]]:
    prefix = f"prom{uuid.uuid4().hex[:8]}:"
    started: list[HubProcess] = []
    try:
        for _ in range(2):
            node = HubProcess("--redis-url", redis_server.url, "--key-prefix", prefix, "--log-level", "warning")
            started.append(node)
            node.start()
        yield started
    finally:
        for node in started:
            node.close()


@pytest.fixture
async def prometheus(nodes: list[HubProcess]) -> AsyncIterator[PrometheusServer]:
    server = PrometheusServer([f"127.0.0.1:{n.port}" for n in nodes])
    try:
        server.start()
        yield server
    finally:
        server.close()


async def _until(
    prometheus: PrometheusServer, session: aiohttp.ClientSession, expected: dict[str, dict[str, float]]
) -> None:
    """Query every expression until each returns exactly its expected vector (a scrape or two after the fact)."""
    deadline = time.monotonic() + 30
    while True:
        got = {expr: await prometheus.query(session, expr) for expr in expected}
        if got == expected:
            return
        assert time.monotonic() < deadline, f"prometheus answers {got}, expected {expected}"
        await asyncio.sleep(0.25)


async def test_prometheus_reads_each_node_s_streams_and_deliveries(
    nodes: list[HubProcess], prometheus: PrometheusServer
) -> None:
    a, b = (f"127.0.0.1:{n.port}" for n in nodes)
    streams = {a: 3, b: 5}
    published = 7
    async with aiohttp.ClientSession() as session:
        await prometheus.wait_ready(session)
        # Both nodes scraped, and nothing counted yet: the figures below are this test's alone.
        await _until(
            prometheus,
            session,
            {
                'up{job="hub"}': {a: 1, b: 1},
                'hub_connections_open{job="hub"}': {a: 0, b: 0},
                'hub_events_delivered_total{job="hub"}': {a: 0, b: 0},
            },
        )
        responses = []
        for node in nodes:
            for _ in range(streams[f"127.0.0.1:{node.port}"]):
                resp = await session.get(f"{node.url}/v1/channels/metered/events")
                # The `retry:` block, then the live position: the stream is registered and will get what follows.
                await resp.content.readuntil(b"\n\n")
                responses.append(resp)
        try:
            # Published through node A only; each node delivers to its own streams from the shared Redis stream.
            async with session.post(
                f"{nodes[0].url}/v1/channels/metered/events", json=[{"data": str(i)} for i in range(4)]
            ) as resp:
                assert resp.status == 201
            async with session.post(
                f"{nodes[0].url}/v1/channels/metered/events", json=[{"data": str(i)} for i in range(4, published)]
            ) as resp:
                assert resp.status == 201
            for stream in responses:
                evs = await collect(stream, count=published)
                assert [e.data for e in evs] == [str(i) for i in range(published)]
            await _until(
                prometheus,
                session,
                {
                    'hub_connections_open{job="hub"}': {a: 3, b: 5},
                    'sum(hub_connections_open{job="hub"})': {"": 8},
                    'hub_events_delivered_total{job="hub"}': {a: 3 * published, b: 5 * published},
                    'sum(hub_events_delivered_total{job="hub"})': {"": 8 * published},
                    'hub_events_published_total{job="hub"}': {a: published, b: 0},
                },
            )
        finally:
            for resp in responses:
                resp.close()
        # Streams closed by their clients leave the gauge; the counters keep what was done.
        await _until(
            prometheus,
            session,
            {
                'sum(hub_connections_open{job="hub"})': {"": 0},
                'sum(hub_events_delivered_total{job="hub"})': {"": 8 * published},
            },
        )
