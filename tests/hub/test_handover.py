"""Live streams are handed over from aiohttp to a minimal protocol (hub.handover): aiohttp forgets them, and the
stream still gets every event, ends properly, frees its limits and counts. These tests pin the aiohttp behaviour the
hand-over relies on: an upgrade that changes it fails here."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp.test_utils import TestClient

from ssecore.backend import Backend
from tests.conftest import ClientFactory
from tests.hub.test_api import publish, subscribe
from tests.support import collect

Client = TestClient[Any, Any]


def _aiohttp_connections(client: Client) -> int:
    runner = client.server.runner
    assert runner is not None and runner.server is not None
    return len(runner.server.connections)


async def _gauge(client: Client, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m is not None
    return float(m.group(1))


async def test_aiohttp_forgets_live_streams_and_they_still_get_every_event(
    make_client: ClientFactory, backend: Backend
) -> None:
    client = await make_client(backend)
    streams = [await subscribe(client, f"h{i % 3}") for i in range(9)]
    await asyncio.sleep(0.1)
    assert all(s.status == 200 and s.headers["Connection"] == "close" for s in streams)
    # Only the connection of this very check is aiohttp's: the nine streams are not.
    assert _aiohttp_connections(client) <= 1
    ids = {c: await publish(client, c, [{"data": f"{c}.{k}"} for k in range(5)]) for c in ("h0", "h1", "h2")}
    for i, s in enumerate(streams):
        evs = await collect(s, count=5)
        assert [e.id for e in evs] == ids[f"h{i % 3}"]
    for s in streams:
        s.close()


async def test_a_handed_over_stream_ends_with_the_last_chunk_and_closes(
    make_client: ClientFactory, backend: Backend
) -> None:
    client = await make_client(backend)
    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /v1/channels/end/events HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Connection: close" in head
    await asyncio.sleep(0.1)
    await publish(client, "end", [{"event": "token", "data": "a"}, {"event": "done", "data": "{}", "close": True}])
    async with asyncio.timeout(10):
        body = await reader.read()  # to EOF: the hub closes the connection after the last chunk
    assert body.endswith(b"0\r\n\r\n")
    assert b"event: done\ndata: {}\n\n" in body
    writer.close()


async def test_a_client_leaving_a_handed_over_stream_frees_its_place(
    make_client: ClientFactory, backend: Backend
) -> None:
    client = await make_client(backend, max_streams_per_client=2)
    first, second = await subscribe(client, "p"), await subscribe(client, "p")
    assert (await subscribe(client, "p")).status == 429
    assert await _gauge(client, "hub_connections_open") == 2
    first.close()
    for _ in range(100):
        if await _gauge(client, "hub_connections_open") == 1:
            break
        await asyncio.sleep(0.02)
    assert await _gauge(client, "hub_connections_open") == 1
    third = await subscribe(client, "p")
    assert third.status == 200
    second.close()
    third.close()
