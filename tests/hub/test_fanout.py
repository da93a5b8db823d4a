"""Fan-out under a subscriber that stops reading: it is cut off and counted; the others lose nothing."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

from ssecore.backend import Backend
from tests.conftest import ClientFactory
from tests.hub.test_api import publish, subscribe
from tests.support import read_events

# These tests publish megabytes as fast as the node takes them, to fill a stalled client's buffers.
_UNLIMITED_BYTES: dict[str, Any] = {"publish_bytes_rate": 1 << 30, "publish_bytes_burst": 1 << 30}


async def _stalled_subscriber(host: str, port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An SSE client that sends its request and then never reads, with a tiny receive window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_slow_consumer_is_cut_off_while_fast_one_gets_everything(
    make_client: ClientFactory, backend: Backend
) -> None:
    client = await make_client(backend, max_buffer_bytes=64 * 1024, **_UNLIMITED_BYTES)
    fast = await subscribe(client, "hot")
    assert client.port is not None
    reader, writer = await _stalled_subscriber(client.host, client.port, "/v1/channels/hot/events")
    await asyncio.sleep(0.2)
    payload = "x" * 32_000
    received: list[str] = []

    async def read_fast() -> None:
        async with asyncio.timeout(60):
            async for ev in read_events(fast):
                received.append(ev.id)
                if ev.data == "last":
                    return

    async def slow_disconnects() -> float:
        text = await (await client.get("/metrics")).text()
        m = re.search(r"^hub_slow_consumer_disconnects_total (\S+)$", text, re.M)
        assert m is not None
        return float(m.group(1))

    reading = asyncio.create_task(read_fast())
    ids: list[str] = []
    # Publish until the stalled client is cut off. The kernel's send buffer for its socket absorbs a few MB first,
    # so the amount needed depends on the machine; the loop is bounded.
    for i in range(200):
        ids += await publish(client, "hot", [{"data": f"{i}.{j}:{payload}"} for j in range(10)])
        if i % 5 == 4 and await slow_disconnects() >= 1:
            break
    ids += await publish(client, "hot", {"data": "last"})
    await reading
    assert received == ids  # the fast subscriber lost nothing and got nothing twice
    assert await slow_disconnects() == 1
    metrics = await (await client.get("/metrics")).text()
    assert "hub_connections_open 1.0" in metrics  # only the fast subscriber is still counted
    # The stalled client finds its connection ended once it reads again (it would resume from its last id).
    async with asyncio.timeout(10):
        while await reader.read(1 << 20):
            pass
    writer.close()
    fast.close()


async def test_http10_client_gets_a_raw_body_and_http11_a_chunked_one(
    make_client: ClientFactory, backend: Backend
) -> None:
    # Live events are written by the fan-out straight to each connection, framed the way that response's body is:
    # HTTP/1.0 has no chunked coding (the body ends with the connection), HTTP/1.1 gets one chunk per write.
    client = await make_client(backend)
    assert client.port is not None
    bodies: dict[str, bytes] = {}
    conns = {}
    for version in ("1.0", "1.1"):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET /v1/channels/raw/events HTTP/{version}\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert (b"Transfer-Encoding: chunked" in head) == (version == "1.1")
        conns[version] = (reader, writer)
    await asyncio.sleep(0.1)
    ids = await publish(client, "raw", [{"data": "one"}, {"data": "two"}])
    await publish(client, "raw", {"data": "three"})
    for version, (reader, writer) in conns.items():
        body = b""
        async with asyncio.timeout(10):
            while body.count(b"data: ") < 3:
                body += await reader.read(65536)
        bodies[version] = body
        writer.close()
    raw = bodies["1.0"]
    assert raw.startswith(b"retry:") and b"\r\n" not in raw  # no chunk framing at all
    assert raw.endswith(b"data: three\n\n") and f"id: {ids[1]}\nevent: message\ndata: two\n\n".encode() in raw
    # The chunked body decodes to the same events.
    chunked, decoded = bodies["1.1"], b""
    while chunked:
        size_line, _, rest = chunked.partition(b"\r\n")
        size = int(size_line, 16)
        decoded, chunked = decoded + rest[:size], rest[size + 2 :]
    assert decoded.endswith(b"data: three\n\n") and f"id: {ids[1]}\nevent: message\ndata: two\n\n".encode() in decoded


async def test_a_channel_whose_last_subscriber_was_cut_off_stops_being_tailed_after_its_linger(
    make_client: ClientFactory, backend: Backend
) -> None:
    client = await make_client(backend, max_buffer_bytes=64 * 1024, linger_s=0.2, tail_block_s=0.1, **_UNLIMITED_BYTES)
    assert client.port is not None
    reader, writer = await _stalled_subscriber(client.host, client.port, "/v1/channels/cold/events")

    async def metric(name: str) -> float:
        text = await (await client.get("/metrics")).text()
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        assert m is not None
        return float(m.group(1))

    async with asyncio.timeout(10):
        while await metric("hub_channels_active") < 1:  # noqa: ASYNC110 - polls the hub's metrics
            await asyncio.sleep(0.05)
    payload = "x" * 32_000
    for i in range(200):
        await publish(client, "cold", [{"data": f"{i}.{j}:{payload}"} for j in range(10)])
        if i % 5 == 4 and await metric("hub_slow_consumer_disconnects_total") >= 1:
            break
    assert await metric("hub_slow_consumer_disconnects_total") == 1
    # Its only subscriber is gone: once the linger has passed the node stops tailing it, and costs the store nothing.
    async with asyncio.timeout(10):
        while await metric("hub_channels_active") > 0:  # noqa: ASYNC110 - polls the hub's metrics
            await asyncio.sleep(0.05)
    writer.close()
    del reader
