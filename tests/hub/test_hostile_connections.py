"""Hostile connections against a live hub process: idle sockets, slowloris headers, bodies that never finish and
clients that never read. The node keeps serving others, closes what stalls, and its memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support import HubProcess, collect

pytestmark = pytest.mark.e2e

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


@pytest.fixture
def hub() -> Iterator[HubProcess]:
    node = HubProcess(
        "--idle-timeout",
        "2",
        "--body-timeout",
        "2",
        "--max-buffer",
        "65536",
        "--log-level",
        "warning",
        "--max-streams-per-client",
        "10000",
        # A client that never reads is fed 12 MB as fast as the node takes it.
        "--publish-bytes-rate",
        str(1 << 30),
        "--publish-bytes-burst",
        str(1 << 30),
    )
    node.start()
    yield node
    node.close()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed_by_server(reader: asyncio.StreamReader, timeout_s: float, what: str) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    data = b""
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        raise AssertionError(f"the node did not close a {what} connection; it sent {data[:100]!r}") from None
    except ConnectionError:
        pass  # reset by the node: closed too
    return data


async def test_stalling_clients_are_closed_and_others_are_served_with_bounded_memory(hub: HubProcess) -> None:
    assert hub.proc is not None
    pid, port = hub.proc.pid, hub.port
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{hub.url}/healthz") as r:
            assert r.status == 200
        before = rss_mib(pid)

        idle = [await _connect(port) for _ in range(1000)]  # never send a byte
        slow = [await _connect(port) for _ in range(50)]
        request = b"GET /v1/channels/x/events HTTP/1.1\r\nHost: hub\r\nAccept: text/event-stream\r\n\r\n"

        async def dribble(writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                for byte in request[:-4]:  # never quite finishes its headers
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dribbling = [asyncio.create_task(dribble(w)) for _, w in slow]
        bodies = [await _connect(port) for _ in range(20)]
        for _, w in bodies:
            w.write(
                b"POST /v1/channels/b/events HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100000\r\n\r\n{"data": "'
            )
            await w.drain()

        # Meanwhile, an ordinary client publishes and subscribes as if nothing were going on.
        started = time.monotonic()
        async with s.get(f"{hub.url}/v1/channels/ok/events") as stream:
            await stream.content.readuntil(b"\n\n")
            async with s.post(f"{hub.url}/v1/channels/ok/events", json={"data": "served"}) as p:
                assert p.status == 201
            [ev] = await collect(stream, count=1, timeout_s=5)
            assert ev.data == "served"
        assert time.monotonic() - started < 5
        during = rss_mib(pid)

        # Everything that stalled is closed by the node: idle and slowloris sockets after --idle-timeout, unfinished
        # bodies with a 408 after --body-timeout.
        for reader, _ in idle[:50]:
            await _closed_by_server(reader, 10, "idle")
        for reader, _ in slow:
            await _closed_by_server(reader, 10, "slowloris")
        for reader, _ in bodies:
            answer = await _closed_by_server(reader, 10, "unfinished body")
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        for reader, _ in idle[50:]:
            await _closed_by_server(reader, 10, "idle")
        for t in dribbling:
            t.cancel()
        for _, w in idle + slow + bodies:
            w.close()
        await asyncio.sleep(0.5)
        after = rss_mib(pid)

    # 1,070 hostile connections at once cost the node a bounded, small amount of memory.
    assert during - before < 40, (before, during)
    assert after - before < 40, (before, after)


async def test_the_node_still_serves_while_a_client_never_reads(hub: HubProcess) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", hub.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /v1/channels/big/events HTTP/1.1\r\nHost: hub\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s:
        payload = "x" * 60_000
        for _ in range(200):  # 12 MB at a client that reads nothing
            async with s.post(f"{hub.url}/v1/channels/big/events", json={"data": payload}) as p:
                assert p.status == 201
        async with s.get(f"{hub.url}/metrics") as m:
            text = await m.text()
    assert "hub_slow_consumer_disconnects_total 1.0" in text
    writer.close()


async def test_clients_that_vanish_before_their_stream_starts_are_no_error(hub: HubProcess) -> None:
    # A reconnect storm, or a browser tab closed mid-request: the connection is reset while the node is still
    # answering it. That is no server error: nothing is logged as one, and nothing stays counted as open.
    async def vanish(i: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        writer.write(f"GET /v1/channels/v{i % 10}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
        writer.transport.abort()

    for _ in range(5):
        await asyncio.gather(*(vanish(i) for i in range(200)))
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            text = await (await session.get(f"{hub.url}/metrics")).text()
            if "hub_connections_open 0.0" in text:
                break
            await asyncio.sleep(0.05)
        assert "hub_connections_open 0.0" in text
    assert "unhandled error" not in hub.log()
