"""Limits: every one refuses clearly (status, Retry-After, which limit), counts in /metrics, and changes nothing."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import orjson
from aiohttp.test_utils import TestClient

from hub.appkeys import JOBS
from ssecore.backend import Backend
from ssecore.queue_memory import MemoryJobQueue
from tests.conftest import ClientFactory

Client = TestClient[Any, Any]
SECRET = "k" * 64


def bearer(sub: str) -> dict[str, str]:
    claims = {"sub": sub, "subscribe": ["*"], "publish": ["*"], "exp": time.time() + 600}
    return {"Authorization": "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")}


async def rejections(client: Client, limit: str) -> float:
    text = await (await client.get("/metrics")).text()
    m = re.search(rf'^hub_limit_rejections_total{{limit="{limit}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_node_stream_limit_is_503_with_retry_after(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, max_streams=2)
    open_ = [await hub.get(f"/v1/channels/c{i}/events") for i in range(2)]
    refused = await hub.get("/v1/channels/c9/events")
    assert refused.status == 503 and refused.headers["Retry-After"]
    assert (await refused.json()) | {"message": ""} == {"error": "max_streams", "limit": "max_streams", "message": ""}
    assert await rejections(hub, "max_streams") == 1
    open_[0].close()
    await asyncio.sleep(0.1)
    again = await hub.get("/v1/channels/c9/events")
    assert again.status == 200
    again.close()
    open_[1].close()


async def test_client_stream_limit_counts_per_token_subject(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, anonymous=False, jwt_secret=SECRET, max_streams_per_client=2)
    alice = [await hub.get("/v1/channels/a/events", headers=bearer("alice")) for _ in range(2)]
    refused = await hub.get("/v1/channels/a/events", headers=bearer("alice"))
    assert refused.status == 429 and (await refused.json())["limit"] == "max_streams_per_client"
    bob = await hub.get("/v1/channels/a/events", headers=bearer("bob"))
    assert bob.status == 200
    for r in [*alice, bob]:
        r.close()


async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    make_client: ClientFactory, backend: Backend
) -> None:
    trusted = await make_client(backend, max_streams_per_client=1, trusted_proxies="127.0.0.1/32")
    a = await trusted.get("/v1/channels/x/events", headers={"X-Forwarded-For": "203.0.113.7"})
    b = await trusted.get("/v1/channels/x/events", headers={"X-Forwarded-For": "198.51.100.9, 127.0.0.1"})
    assert a.status == 200 and b.status == 200  # two clients behind the proxy
    same = await trusted.get("/v1/channels/x/events", headers={"X-Forwarded-For": "203.0.113.7"})
    assert same.status == 429
    for r in (a, b):
        r.close()
    untrusted = await make_client(backend, max_streams_per_client=1, trusted_proxies="10.0.0.1")
    c = await untrusted.get("/v1/channels/x/events", headers={"X-Forwarded-For": "203.0.113.7"})
    d = await untrusted.get("/v1/channels/x/events", headers={"X-Forwarded-For": "198.51.100.9"})
    assert c.status == 200 and d.status == 429  # a forged header from an untrusted peer changes nothing
    c.close()


async def test_publish_rate_is_a_token_bucket_per_publisher(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, anonymous=False, jwt_secret=SECRET, publish_rate=5, publish_burst=10, max_batch=10)
    ok = await hub.post("/v1/channels/r/events", json=[{"data": i} for i in range(10)], headers=bearer("alice"))
    assert ok.status == 201
    refused = await hub.post("/v1/channels/r/events", json=[{"data": "x"}] * 3, headers=bearer("alice"))
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert (await refused.json())["limit"] == "publish_rate"
    assert (await (await hub.get("/v1/channels/r", headers=bearer("alice"))).json())["length"] == 10  # nothing added
    other = await hub.post("/v1/channels/r/events", json={"data": "y"}, headers=bearer("bob"))
    assert other.status == 201  # another publisher has its own bucket
    await asyncio.sleep(0.7)  # 5 events/s: three tokens back after 0.6 s
    assert (await hub.post("/v1/channels/r/events", json=[{"data": "z"}] * 3, headers=bearer("alice"))).status == 201
    assert await rejections(hub, "publish_rate") == 1


async def test_size_limits_say_which_limit_and_change_nothing(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, max_batch=3, max_event_bytes=2048, max_channel_len=10)
    assert (await hub.post("/v1/channels/s/events", json={"data": "first"})).status == 201
    cases = [
        ("/v1/channels/s/events", [{"data": 1}] * 4, 413, "max_batch"),
        ("/v1/channels/s/events", {"data": "x" * 2049}, 413, "max_event_bytes"),
        ("/v1/channels/s/events", {"data": "é" * 1100}, 413, "max_event_bytes"),  # bytes, not characters
        ("/v1/channels/elevenchars/events", {"data": 1}, 400, "invalid_channel"),
    ]
    for path, body, status, code in cases:
        resp = await hub.post(path, json=body)
        assert resp.status == status, code
        assert (await resp.json())["error"] == code
    assert (await (await hub.get("/v1/channels/s")).json())["length"] == 1


async def test_publish_bytes_are_rate_limited_per_publisher(make_client: ClientFactory, backend: Backend) -> None:
    # The defaults: 1 MiB/s with a 4 MiB burst. Bodies of about 1 MB, four events each (well within the event rate).
    hub = await make_client(backend, anonymous=False, jwt_secret=SECRET)
    big = [{"data": "x" * 250_000}] * 4
    statuses = []
    started = time.monotonic()
    for _ in range(30):
        resp = await hub.post("/v1/channels/big/events", json=big, headers=bearer("alice"))
        statuses.append(resp.status)
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["limit"] == "publish_bytes_rate"
    elapsed = time.monotonic() - started
    accepted = statuses.count(201)
    assert statuses.count(429) == 30 - accepted
    # The burst, and what the rate gave back meanwhile (one body a second), with one to spare for rounding.
    assert 4 <= accepted <= 4 + elapsed + 1, (accepted, elapsed)
    info = await (await hub.get("/v1/channels/big", headers=bearer("alice"))).json()
    assert info["length"] == 4 * accepted  # a refused body added nothing
    assert await rejections(hub, "publish_bytes_rate") == 30 - accepted
    # Another publisher has its own buckets: small publishes still pass.
    for i in range(20):
        small = await hub.post("/v1/channels/big/events", json={"data": i}, headers=bearer("bob"))
        assert small.status == 201


async def test_a_refused_byte_budget_charges_no_events(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(
        backend,
        publish_rate=1,
        publish_burst=3,
        max_batch=3,
        max_body_bytes=4096,
        max_job_bytes=4096,
        publish_bytes_burst=4096,
        publish_bytes_rate=1,
    )
    assert (await hub.post("/v1/channels/b/events", json={"data": "x" * 3000})).status == 201
    refused = await hub.post("/v1/channels/b/events", json={"data": "y" * 3000})
    assert refused.status == 429 and (await refused.json())["limit"] == "publish_bytes_rate"
    # The two events left in the event bucket are still there: the refusal took none.
    assert (await hub.post("/v1/channels/b/events", json=[{"data": 1}, {"data": 2}])).status == 201


async def test_generation_jobs_are_bounded_in_bytes(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, max_job_bytes=2048)
    job = {"provider": "demo", "model": "demo:1", "messages": [{"role": "user", "content": "x" * 3000}]}
    headers = {"Content-Type": "application/json"}
    refused = await hub.post("/v1/generations", data=orjson.dumps(job), headers=headers)
    assert refused.status == 413
    body = await refused.json()
    assert body["error"] == "max_job_bytes" and body["limit"] == "max_job_bytes" and "2048" in body["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: measured as it is read
        raw = orjson.dumps(job)
        for i in range(0, len(raw), 1000):
            yield raw[i : i + 1000]

    chunked = await hub.post("/v1/generations", data=chunks(), headers=headers)
    assert chunked.status == 413 and (await chunked.json())["limit"] == "max_job_bytes"
    assert await rejections(hub, "max_job_bytes") == 2
    jobs = hub.app[JOBS]
    assert isinstance(jobs, MemoryJobQueue) and not jobs._pending and not jobs._records
    small = {**job, "messages": [{"role": "user", "content": "x" * 1000}]}
    assert (await hub.post("/v1/generations", data=orjson.dumps(small), headers=headers)).status == 202


async def test_generation_jobs_count_toward_the_byte_rate(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(
        backend, max_body_bytes=65536, max_job_bytes=65536, publish_bytes_burst=65536, publish_bytes_rate=1
    )
    job = {"provider": "demo", "model": "demo:1", "messages": [{"role": "user", "content": "x" * 40_000}]}
    headers = {"Content-Type": "application/json"}
    assert (await hub.post("/v1/generations", data=orjson.dumps(job), headers=headers)).status == 202
    refused = await hub.post("/v1/generations", data=orjson.dumps(job), headers=headers)
    assert refused.status == 429 and refused.headers["Retry-After"]
    assert (await refused.json())["limit"] == "publish_bytes_rate"


async def test_jobs_may_be_larger_than_publish_bodies(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, max_body_bytes=4096, max_job_bytes=65536, publish_bytes_burst=65536)
    raw = orjson.dumps({"data": "x" * 10_000})

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the publish limit is checked on what arrived
        for i in range(0, len(raw), 1000):
            yield raw[i : i + 1000]

    refused = await hub.post("/v1/channels/p/events", data=chunks(), headers={"Content-Type": "application/json"})
    assert refused.status == 413 and (await refused.json())["error"] == "body_too_large"
    assert (await hub.get("/v1/channels/p")).status == 404  # nothing was published
    job = {"provider": "demo", "model": "demo:1", "messages": [{"role": "user", "content": "x" * 10_000}]}
    accepted = await hub.post("/v1/generations", data=orjson.dumps(job), headers={"Content-Type": "application/json"})
    assert accepted.status == 202
