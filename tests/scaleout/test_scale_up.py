"""A scale-up behind nginx: two nodes started with --max-connection-age carry 150 streams of a steady publish, then a
third node is started and nginx reloaded with it in its node list. Within three ages the new node carries a fair
share of the streams, because each stream ends at its age and its client reconnects through least_conn, and every
client still gets every event once, in order. The control runs the same without the setting: long-lived streams
never come back to the balancer, so the new node stays (almost) empty. That is what the setting is for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ssecore.backend import Entry
from tests.scaleout.cluster import RETRY_MS, Load, Publisher, assert_exact, metric
from tests.scaleout.conftest import ClusterFactory, Record
from tests.support import HubProcess, ResumingClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

AGE_S = 3.0  # --max-connection-age: a stream lasts 2.4-3 s
CHANNELS = 10
CLIENTS = 150
RATE_PER_S = 20  # publish requests, one event each, round robin over the channels
# Three ages after the reload: every stream opened before it has aged out and reconnected at least twice. Generous on
# purpose (one age should do): the machine has two shared cores.
WINDOW_S = 3 * AGE_S
# A third of the streams is what least_conn aims at; 20% leaves room for a slow machine and sampling noise.
FAIR_SHARE = 0.20
SAMPLE_S = 0.5


@pytest.fixture
async def stream_session() -> AsyncIterator[aiohttp.ClientSession]:
    """The subscribers' session: a new connection per stream. A reload closes the old nginx workers' idle keep-alive
    connections, and aiohttp, unlike a browser, does not retry a request that it sent on one of those just as it was
    closed: the reconnect would fail before any node saw it, an artifact of the client's pool, not of the hub."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        yield s


async def _streams(session: aiohttp.ClientSession, nodes: list[HubProcess]) -> list[int]:
    """Open streams on each node, from each node's own /metrics, read at once so that the figures add up."""
    return [int(v) for v in await asyncio.gather(*(metric(session, n, "hub_connections_open") for n in nodes))]


# About 15 s each here; the bounds of its waits add up to more than the default 60 s on a slow machine.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_age_s", [AGE_S, 0.0], ids=["max-connection-age", "control-without"])
async def test_a_node_added_by_a_scale_up_gets_its_share_of_the_streams_and_no_event_is_lost_or_repeated(
    make_cluster: ClusterFactory,
    session: aiohttp.ClientSession,
    stream_session: aiohttp.ClientSession,
    record: Record,
    max_age_s: float,
) -> None:
    flags = ("--max-connection-age", str(max_age_s)) if max_age_s else ()
    cluster = await make_cluster(nodes=2, node_flags=flags)
    for node in cluster.nodes:
        await cluster.wait_ready(node, session)
    channels = [f"scale:{i}" for i in range(CHANNELS)]
    of_client = [channels[i % CHANNELS] for i in range(CLIENTS)]
    # Live subscriptions (no position): each stream starts at the channel's end as it is when the stream opens.
    clients = [ResumingClient(stream_session, f"{cluster.url}/v1/channels/{ch}/events") for ch in of_client]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    publisher = Publisher(session, cluster.url, channels, RATE_PER_S)
    load = Load(publisher, channels, tasks)
    samples: list[tuple[float, list[int]]] = []
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.opened.wait() for c in clients))
        # Every stream is open, so every client is owed every event published from now on.
        load.publish()
        # One age of steady publishing first: with the setting every stream has aged out and come back once by then,
        # still onto the two nodes, so the scale-up happens in the middle of ordinary reconnects.
        await asyncio.sleep(AGE_S)
        before = await _streams(session, cluster.nodes)
        scaling = time.monotonic()
        await cluster.scale_up(session)
        reloaded = time.monotonic()
        while (elapsed := time.monotonic() - reloaded) < WINDOW_S:
            samples.append((elapsed, await _streams(session, cluster.nodes)))
            await asyncio.sleep(SAMPLE_S)
        after = await _streams(session, cluster.nodes)
        await load.finish()
    except BaseException:
        load.abandon()
        raise

    entries: dict[str, list[Entry]] = {ch: await cluster.entries(ch) for ch in channels}
    window_end = reloaded + WINDOW_S
    new_node = [s[2] for _, s in samples]
    reached = next((t for t, s in samples if s[2] >= FAIR_SHARE * CLIENTS), None)
    in_window = sorted(a.sent - reloaded for c in clients for a in c.attempts if reloaded <= a.sent < window_end)
    failed = [a for c in clients for a in c.attempts if a.status not in (200, 204)]
    errors = [a.error for c in clients for a in c.attempts if a.error is not None]
    figures = {
        "max_connection_age_s": max_age_s,
        "retry_hint_max_s": RETRY_MS / 1000,
        "clients": CLIENTS,
        "channels": CHANNELS,
        "publish_rate_per_s": RATE_PER_S,
        "streams_per_node_before": before,
        "streams_per_node_after": after,
        "new_node_share_after": round(after[2] / CLIENTS, 3),
        "new_node_ready_and_reloaded_after_s": round(reloaded - scaling, 3),
        "time_to_fair_share_s": None if reached is None else round(reached, 3),
        "fair_share": FAIR_SHARE,
        "window_s": WINDOW_S,
        "new_node_streams_every_0_5_s": new_node,
        "reconnects": sum(len(c.attempts) - 1 for c in clients),
        "reconnects_in_window": len(in_window),
        # The streams all opened within a second of each other, so the first ages still come in waves: the new node
        # can get nothing before the next stream ends.
        "first_reconnect_after_reload_s": round(in_window[0], 3) if in_window else None,
        "events_published": sum(len(v) for v in publisher.acked.values()),
        "publish_failures": publisher.failures,
        "events_delivered": sum(len(c.events) for c in clients),
        "lost": sum(
            len({e.id for e in entries[ch]} - {e.id for e in c.events})
            for c, ch in zip(clients, of_client, strict=True)
        ),
        "duplicated": sum(len(c.events) - len({e.id for e in c.events}) for c in clients),
        "failed_connections": len(failed),
        "connection_errors": errors[:5],
        "connection_errors_count": len(errors),
    }
    record("scale_up" if max_age_s else "scale_up_control", figures)

    for ch in channels:
        ticks = [e for e in entries[ch] if e.event == "tick"]
        # Each publish stored once, in order, and its answer named the ids that were stored.
        assert [e.data for e in ticks] == [str(i) for i in range(len(ticks))]
        assert [e.event for e in entries[ch][len(ticks) :]] == ["end"]
        assert [e.id for e in entries[ch]] == publisher.acked[ch]
    for c, ch in zip(clients, of_client, strict=True):
        assert_exact(c, entries[ch])
    assert failed == []
    # least_conn spread the first streams over both nodes.
    assert min(before) > 0, figures
    if max_age_s:
        assert after[2] >= FAIR_SHARE * CLIENTS, figures
        assert reached is not None, figures
    else:
        # No stream ever ends by itself, so none comes back to the balancer to be sent to the new node.
        assert after[2] <= 0.05 * CLIENTS, figures
        assert reached is None, figures
