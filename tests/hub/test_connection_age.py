"""--max-connection-age: streams end by themselves, spread out, with a retry hint, and resume with nothing lost."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from aiohttp.test_utils import TestClient

from ssecore.backend import Backend
from ssecore.sse import SSEParser
from tests.conftest import ClientFactory
from tests.hub.test_api import publish, subscribe

Client = TestClient[Any, Any]


async def _read_to_end(resp: Any, timeout_s: float = 10) -> tuple[bytes, float]:
    """The whole body of a stream that ends by itself, and when it ended."""
    body = await asyncio.wait_for(resp.content.read(), timeout_s)
    return body, time.monotonic()


async def test_an_aged_stream_ends_with_a_retry_hint_and_its_resume_misses_nothing(
    make_client: ClientFactory, backend: Backend
) -> None:
    node = await make_client(backend, max_connection_age_s=1.0, retry_ms=500)
    opened = time.monotonic()
    stream = await subscribe(node, "c")
    before = await publish(node, "c", [{"data": "1"}, {"data": "2"}])
    body, ended = await _read_to_end(stream)
    assert ended - opened >= 0.75  # not before 80% of the age (a little slack for the clock's start)
    # The last block tells EventSource how soon to come back; the stream is otherwise a normal one.
    hint = re.fullmatch(rb".*\nretry: (\d+)\n\n", body, re.S)
    assert hint is not None, body[-80:]
    assert 125 <= int(hint.group(1)) <= 500  # a quarter to all of --retry-ms
    parser = SSEParser()
    got = [ev.id for ev in parser.feed(body) if ev.data]
    assert got == before
    after = await publish(node, "c", {"data": "3"})
    resumed = await subscribe(node, "c", last_id=got[-1])
    body, _ = await _read_to_end(resumed)
    assert [ev.id for ev in SSEParser().feed(body) if ev.data] == after


async def test_streams_opened_together_do_not_all_end_together(make_client: ClientFactory, backend: Backend) -> None:
    node = await make_client(backend, max_connection_age_s=2.0)
    opened = time.monotonic()
    streams = [await subscribe(node, f"c{i % 3}") for i in range(30)]
    ends = [t - opened for _, t in await asyncio.gather(*(_read_to_end(s) for s in streams))]
    assert min(ends) >= 1.5
    assert max(ends) - min(ends) >= 0.05, sorted(ends)  # drawn from 1.6-2.0 s: a spread, not one instant


async def test_without_the_setting_streams_do_not_age_out(make_client: ClientFactory, backend: Backend) -> None:
    node = await make_client(backend)
    stream = await subscribe(node, "c")
    await asyncio.sleep(1.5)
    assert not stream.content.at_eof()
    ids = await publish(node, "c", {"data": "still here"})
    line = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
    while not line.startswith(b"id: " + ids[0].encode()):
        line = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
    stream.close()
