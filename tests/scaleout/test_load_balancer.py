"""What deploy/nginx/hub.conf itself promises, checked through a running nginx: only the API and the demo page are
routed, the nodes (not nginx) refuse oversized publish bodies, and a publish that meets a dead node is stored once, by
a live one."""

from __future__ import annotations

import asyncio
import io
import time

import aiohttp
import pytest

from tests.scaleout.conftest import ClusterFactory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def test_only_the_api_is_routed_and_a_node_refuses_an_oversized_body_itself(
    make_cluster: ClusterFactory, session: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster()
    for path in ("/metrics", "/readyz", "/healthz", "/v1x"):
        async with session.get(f"{cluster.url}{path}") as resp:
            assert resp.status == 404, path
    for path in ("/v1/openapi.json", "/", "/static/hub-client.js"):  # the API, and the demo page with its scripts
        async with session.get(f"{cluster.url}{path}") as resp:
            assert resp.status == 200, path
    # Over the nodes' 1 MiB: the answer is the hub's JSON error, which names the limit, not nginx's error page.
    body = b'{"data": "' + b"x" * (1 << 20) + b'"}'
    async with session.post(
        f"{cluster.url}/v1/channels/big/events", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"


async def test_a_publish_that_meets_a_dead_node_is_stored_once_by_a_live_one(
    make_cluster: ClusterFactory, session: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster()
    dead = cluster.nodes[1]
    cluster.kill(dead)
    # With no streams open, least_conn takes the nodes in turn: one of the first three publishes goes to the dead
    # node, whose refused connection sends it on to a live one. The POST was never sent, so it is stored once.
    for i in range(6):
        async with session.post(f"{cluster.url}/v1/channels/pub/events", json={"data": str(i)}) as resp:
            assert resp.status == 201, await resp.text()
    assert [e.data for e in await cluster.entries("pub")] == [str(i) for i in range(6)]
    passed_over = [line for line in cluster.lb.access_log() if f"upstream=127.0.0.1:{dead.port}, " in line]
    assert len(passed_over) == 1 and '"POST /v1/channels/pub/events' in passed_over[0], cluster.lb.access_log()


async def test_a_token_in_the_query_stays_out_of_the_access_log(
    make_cluster: ClusterFactory, session: aiohttp.ClientSession
) -> None:
    cluster = await make_cluster()
    secret = "eyJ-not-for-logs"
    async with session.get(f"{cluster.url}/v1/channels/no-such?access_token={secret}&x=1") as resp:
        assert resp.status == 404
    deadline = time.monotonic() + 10
    while not (logged := [line for line in cluster.lb.access_log() if "/v1/channels/no-such" in line]):
        assert time.monotonic() < deadline, cluster.lb.access_log()
        await asyncio.sleep(0.05)
    assert '"GET /v1/channels/no-such HTTP/1.1" 404' in logged[0], cluster.lb.access_log()
    assert not [line for line in cluster.lb.access_log() if secret in line]
