"""A rolling restart behind nginx: each node in turn is stopped with SIGTERM and started again on its port while 200
clients stream a steady publish. Every client gets every event once, and each draining node spreads the ends of its
streams over its drain period instead of sending all its clients back at once."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import aiohttp
import pytest

from hub.app import _DRAIN_SPREAD
from tests.scaleout.cluster import GRACE_S, Load, Publisher, assert_exact, fail_timeout_s, metric
from tests.scaleout.conftest import ClusterFactory, Record
from tests.support import ResumingClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHANNELS = 10
CLIENTS = 200
RATE_PER_S = 40  # publish requests, one event each, round robin over the channels


@dataclass
class Drain:
    port: int
    streams: int  # open on the node just before its SIGTERM
    spread: list[int]  # open on each node then
    signalled: float
    exited: float
    ready: float
    code: int


@pytest.mark.timeout(120)
async def test_rolling_restart_delivers_every_event_once_and_spreads_each_drain(
    make_cluster: ClusterFactory, session: aiohttp.ClientSession, record: Record
) -> None:
    cluster = await make_cluster()
    channels = [f"roll:{i}" for i in range(CHANNELS)]
    # Live subscriptions (no position): each stream starts at the channel's end as it is when the stream opens.
    clients = [
        ResumingClient(session, f"{cluster.url}/v1/channels/{channels[i % CHANNELS]}/events") for i in range(CLIENTS)
    ]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    publisher = Publisher(session, cluster.url, channels, RATE_PER_S)
    load = Load(publisher, channels, tasks)
    drains: list[Drain] = []
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(c.opened.wait() for c in clients))
        # Every stream is open, so every client is owed every event published from now on.
        load.publish()
        await asyncio.sleep(1)
        for node in cluster.nodes:
            spread = [int(await metric(session, n, "hub_connections_open")) for n in cluster.nodes]
            streams = spread[cluster.nodes.index(node)]
            signalled = time.monotonic()
            node.signal(signal.SIGTERM)
            code = await asyncio.to_thread(node.wait, 15)
            exited = time.monotonic()
            await asyncio.to_thread(node.start)  # the same port: nginx's upstream list does not change
            await cluster.wait_ready(node, session)
            drains.append(Drain(node.port, streams, spread, signalled, exited, time.monotonic(), code))
            # nginx counted the node's 503s while it drained as failures and skips it for fail_timeout: before the
            # next node goes, wait until it takes streams again, or they would all crowd onto the last node.
            await asyncio.sleep(fail_timeout_s() + 0.5)
        await load.finish()
    except BaseException:
        load.abandon()
        raise

    entries = {ch: await cluster.entries(ch) for ch in channels}
    spread_s = GRACE_S * _DRAIN_SPREAD
    per_node = []
    for d in drains:
        # The streams that ended while the node drained: only its own (the others' streams go on).
        drained = [
            a
            for c in clients
            for a in c.attempts
            if a.ended is not None and d.signalled <= a.ended <= d.ready and a.status == 200
        ]
        ends = sorted(a.ended for a in drained if a.ended is not None)
        per_node.append(
            {
                "streams_on_node": d.streams,
                "streams_per_node_before": d.spread,
                "streams_ended_while_draining": len(ends),
                "ended_cleanly": sum(a.error is None for a in drained),
                "ends_span_s": round(ends[-1] - ends[0], 3) if ends else None,
                "first_end_after_sigterm_s": round(ends[0] - d.signalled, 3) if ends else None,
                "exit_after_sigterm_s": round(d.exited - d.signalled, 3),
                "ready_after_restart_s": round(d.ready - d.exited, 3),
                "exit_code": d.code,
            }
        )
    delivered = sum(len(c.events) for c in clients)
    duplicated = sum(len(c.events) - len({e.id for e in c.events}) for c in clients)
    lost = sum(
        len({e.id for e in entries[ch]} - {e.id for e in c.events})
        for c, ch in zip(clients, _cycle(channels), strict=True)
    )
    failed = [a for c in clients for a in c.attempts if a.status not in (200, 204)]
    record(
        "rolling_restart",
        {
            "clients": CLIENTS,
            "channels": CHANNELS,
            "events_published": sum(len(v) for v in publisher.acked.values()),
            "publish_failures": publisher.failures,
            "events_delivered": delivered,
            "lost": lost,
            "duplicated": duplicated,
            "failed_connections": len(failed),
            "drain_spread_configured_s": spread_s,
            "nodes": per_node,
        },
    )
    for ch in channels:
        ticks = [e for e in entries[ch] if e.event == "tick"]
        # Each publish stored once, in order, and its answer named the ids that were stored.
        assert [e.data for e in ticks] == [str(i) for i in range(len(ticks))]
        assert [e.event for e in entries[ch][len(ticks) :]] == ["end"]
        assert [e.id for e in entries[ch]] == publisher.acked[ch]
    for c, ch in zip(clients, _cycle(channels), strict=True):
        assert_exact(c, entries[ch])
    assert failed == []
    for d, figures in zip(drains, per_node, strict=True):
        assert d.code == 0
        assert d.streams > 0 and figures["streams_ended_while_draining"] == d.streams, figures
        # Each with its pending events and a proper end of the response, not a cut connection.
        assert figures["ended_cleanly"] == d.streams, figures
        # Spread at random over `spread_s`: a few dozen ends within a quarter of it would mean they were not spread.
        span = figures["ends_span_s"]
        assert isinstance(span, float) and span > spread_s / 4, figures


def _cycle(channels: list[str]) -> list[str]:
    """The channel of each client, in the order the clients were made."""
    return [channels[i % len(channels)] for i in range(CLIENTS)]
