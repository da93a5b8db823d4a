"""Idempotency-Key on publish: a publisher's retry, on the same node or another, appends nothing twice."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ssecore.backend_redis import RedisBackend
from tests.conftest import ClientFactory
from tests.hub.test_api import subscribe
from tests.support import RedisServer, collect

Client = TestClient[Any, Any]
URL = "/v1/channels/{}/events"


async def post(client: Client, channel: str, body: Any, key: str | None) -> tuple[int, Any, str | None]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    resp = await client.post(URL.format(channel), json=body, headers=headers)
    return resp.status, await resp.json(), resp.headers.get("Idempotent-Replayed")


async def channel_length(client: Client, channel: str) -> int:
    resp = await client.get(f"/v1/channels/{channel}")
    length: int = (await resp.json())["length"]
    return length


async def test_a_retry_with_the_same_key_is_answered_with_the_first_ids_and_appends_nothing(client: Client) -> None:
    body = [{"event": "token", "data": "a"}, {"event": "token", "data": "b"}]
    status, first, replayed = await post(client, "c", body, "req-1")
    assert status == 201 and len(first["ids"]) == 2 and replayed is None
    for _ in range(3):
        assert await post(client, "c", body, "req-1") == (201, first, "true")
    assert await channel_length(client, "c") == 2
    metrics = await (await client.get("/metrics")).text()
    assert "hub_publish_replays_total 3.0" in metrics
    assert "hub_events_published_total 2.0" in metrics


async def test_subscribers_see_a_retried_publish_once(client: Client) -> None:
    live = await subscribe(client, "c")  # live from the channel's position when it answered: nothing is missed
    first = await post(client, "c", {"data": "x"}, "k")
    await post(client, "c", {"data": "x"}, "k")
    last = await post(client, "c", {"data": "y"}, None)
    events = await collect(live, count=2)
    live.close()
    assert [ev.id for ev in events] == [first[1]["ids"][0], last[1]["ids"][0]]


async def test_a_key_reused_for_other_events_is_refused_with_422_and_changes_nothing(client: Client) -> None:
    await post(client, "c", {"data": "x"}, "k")
    status, body, _ = await post(client, "c", {"data": "other"}, "k")
    assert status == 422 and body["error"] == "idempotency_key_reused"
    status, body, _ = await post(client, "c", {"data": "x", "close": True}, "k")  # close is part of the request
    assert status == 422
    assert await channel_length(client, "c") == 1


@pytest.mark.parametrize("key", ["", "a b", "é", "x" * 256, "tab\there"])
async def test_a_malformed_key_is_a_400_before_anything_is_appended(client: Client, key: str) -> None:
    resp = await client.post(URL.format("c"), json={"data": "x"}, headers={"Idempotency-Key": key})
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_idempotency_key"
    assert (await client.get("/v1/channels/c")).status == 404


async def test_concurrent_retries_append_once(client: Client) -> None:
    results = await asyncio.gather(*(post(client, "c", {"data": "x"}, "race") for _ in range(20)))
    assert {status for status, _, _ in results} == {201}
    assert len({tuple(body["ids"]) for _, body, _ in results}) == 1
    assert sum(replayed is None for _, _, replayed in results) == 1
    assert await channel_length(client, "c") == 1


async def test_a_retry_on_another_node_is_answered_from_the_first(
    make_client: ClientFactory, redis_server: RedisServer
) -> None:
    prefix = f"idem:{uuid.uuid4().hex[:8]}:"
    backends = [RedisBackend(redis_server.url, prefix=prefix, history=100, ttl_s=60) for _ in range(2)]
    try:
        a, b = [await make_client(backend) for backend in backends]
        first = await post(a, "c", {"data": "x"}, "k")
        assert await post(b, "c", {"data": "x"}, "k") == (201, first[1], "true")
        assert await channel_length(b, "c") == 1
    finally:
        for backend in backends:
            await backend.aclose()
