"""The load tester's Nchan target end to end: real nginx + Nchan from bench/nchan.conf.template, a small fan-out run
with `--target nchan`, and every event accounted for exactly (no figures are checked: they are the benchmark's)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bench.nchan import NchanServer, missing
from loadtest.adapters import NchanAdapter, PublishError
from ssecore.sse import SSEParser
from tests.support import ROOT, free_port

_MISSING = missing()
needs_nchan = pytest.mark.skipif(_MISSING is not None, reason=f"nginx + Nchan not available: {_MISSING}")


@pytest.fixture
def nchan() -> Iterator[NchanServer]:
    server = NchanServer(free_port())
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.mark.e2e
@pytest.mark.slow
@needs_nchan
def test_fanout_through_nchan_accounts_for_every_event_exactly(nchan: NchanServer, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    assert nchan.worker_pid is not None
    args = ["fanout", "--target", "nchan", "--url", nchan.url, "--connections", "50", "--channels", "5"]
    args += ["--rate", "200", "--events", "200", "--workers", "2", "--pid", str(nchan.worker_pid), "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=ROOT, capture_output=True, timeout=50)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:] + "\n" + nchan.log_tail()
    r = orjson.loads(out.read_bytes())
    assert r["ok"] is True and r["problems"] == []
    c, d = r["connections"], r["delivery"]
    assert (c["opened"], c["failed"], c["dropped"]) == (50, 0, 0)
    assert (d["missing"], d["gaps"], d["duplicates"], d["out_of_order"], d["beyond"]) == (0, 0, 0, 0, 0)
    assert (d["unexpected"], d["resets"], d["publish_errors"]) == (0, 0, 0)
    # 200 events over 5 channels, 10 subscribers on each: every subscriber gets all 40 of its channel, once, in order.
    assert d["published"] == 200 and d["publish_requests"] == 200
    assert d["subscribers"] == d["complete_subscribers"] == 50
    assert d["delivered"] == d["expected"] == 10 * 200
    # The worker, not the master, was sampled: it is the process that served the run.
    assert r["hub"]["pids"] == [nchan.worker_pid] and r["hub"]["rss_peak_bytes"] > 0


def test_stream_is_ready_only_after_nchan_says_hi() -> None:
    # What Nchan sends first, after the head: the comment `: hi`, once the subscriber is on the channel.
    adapter, parser = NchanAdapter(), SSEParser()
    assert not adapter.stream_ready(parser)
    assert parser.feed(b": h") == [] and not adapter.stream_ready(parser)
    assert parser.feed(b"i\n\n") == [] and adapter.stream_ready(parser)


async def test_a_batch_failing_part_way_says_how_many_were_stored(aiohttp_server: Any) -> None:
    # Nchan takes one message per request, so a "batch" is several requests and can fail half-way. The publisher must
    # learn what was stored, or it would reuse those sequence numbers and the subscribers would count duplicates.
    # A stand-in for Nchan's publisher location that refuses the third message.
    stored: list[bytes] = []

    async def pub(request: web.Request) -> web.Response:
        if len(stored) == 2:
            return web.Response(status=503, text="overloaded")
        stored.append(await request.read())
        return web.Response(status=201)

    app = web.Application()
    app.router.add_post("/pub/{channel}", pub)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(PublishError) as caught:
            await NchanAdapter().publish(session, str(server.make_url("")), "c", ["a", "b", "c", "d"], {})
    assert (caught.value.reason, caught.value.accepted) == ("http_503", 2)
    assert stored == [b"a", b"b"]
