"""A hub node killed (kill -9) in the middle of generations, behind nginx: every client reconnects through the
balancer to another node with Last-Event-ID and ends with exactly the generation's events, none lost or repeated."""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp
import pytest

from ssecore.backend import parse_id
from tests.scaleout.cluster import RETRY_MS, assert_exact, metric, submit, until
from tests.scaleout.conftest import ClusterFactory, Record
from tests.support import Attempt, HubProcess, ResumingClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Event = tuple[str, str, str]  # id, name, data


def _after_kill(client: ResumingClient, killed: float) -> tuple[Attempt, Attempt]:
    """The connection the kill cut, and the first one that was served after it."""
    cut = next(a for a in client.attempts if a.ended is not None and a.ended >= killed and a.sent < killed)
    resumed = next(a for a in client.attempts if a.sent > killed and a.status == 200)
    return cut, resumed


def _failed_after(client: ResumingClient, killed: float) -> list[Attempt]:
    """Connections after the kill that the balancer did not serve (neither a stream nor the final 204)."""
    return [a for a in client.attempts if a.sent > killed and a.status not in (200, 204)]


async def test_a_client_resumes_on_another_node_when_its_node_is_killed_mid_generation(
    make_cluster: ClusterFactory, session: aiohttp.ClientSession, record: Record
) -> None:
    cluster = await make_cluster(tokens_per_s=20)
    job = await submit(session, cluster.url, tokens=80)  # 4 s at 20 tokens/s
    client = ResumingClient(session, f"{cluster.url}{job['events_url']}?last_event_id=0")
    task = asyncio.create_task(client.run())
    try:
        await until(lambda: sum(e.event == "token" for e in client.events) >= 15, "15 tokens")
        open_streams = [await metric(session, n, "hub_connections_open") for n in cluster.nodes]
        assert sorted(open_streams) == [0, 0, 1], open_streams
        victim = cluster.nodes[open_streams.index(1)]
        received_before = len(client.events)
        killed = time.monotonic()
        cluster.kill(victim)
        async with asyncio.timeout(30):
            await task
    except BaseException:
        task.cancel()
        raise
    entries = await cluster.entries(job["channel"])
    failed = _failed_after(client, killed)
    cut, resumed = _after_kill(client, killed)
    assert cut.ended is not None and resumed.opened is not None and resumed.first_event is not None
    record(
        "kill_one_client",
        {
            "retry_hint_s": RETRY_MS / 1000,
            "events_before_kill": received_before,
            "events_total": len(entries),
            "connection_cut_after_s": round(cut.ended - killed, 4),
            "cut_cleanly": cut.error is None,
            "reconnected_after_s": round(resumed.opened - killed, 4),
            "time_to_resume_s": round(resumed.first_event - killed, 4),
            "connections": len(client.attempts),
            "failed_reconnects": len(failed),
            **_accounting([client], [[(e.id, e.event, e.data) for e in entries]]),
        },
    )
    assert [e.event for e in entries] == ["start"] + ["token"] * 80 + ["done"]
    assert received_before < len(entries)  # the kill did land mid-generation
    assert_exact(client, entries)
    assert failed == []  # every reconnect landed on a live node


async def _resumes(session: aiohttp.ClientSession, nodes: list[HubProcess]) -> dict[str, float]:
    """Streams the nodes opened from a Last-Event-ID, by where they found the missed events."""
    return {
        source: sum([await metric(session, n, f'hub_resumes_total{{source="{source}"}}', 0.0) for n in nodes])
        for source in ("window", "store")
    }


def _accounting(clients: list[ResumingClient], expected: list[list[Event]]) -> dict[str, int]:
    """Events lost, duplicated and received out of order over all clients, counted before the exact comparison so
    that the figures are recorded even when it fails."""
    lost = duplicated = out_of_order = 0
    for c, want in zip(clients, expected, strict=True):
        ids = [e.id for e in c.events]
        duplicated += len(ids) - len(set(ids))
        lost += len({w[0] for w in want} - set(ids))
        keys = [parse_id(i) for i in ids]
        out_of_order += sum(1 for a, b in zip(keys, keys[1:], strict=False) if a >= b)
    return {"lost": lost, "duplicated": duplicated, "out_of_order": out_of_order}


@pytest.mark.timeout(120)
async def test_200_clients_on_50_generations_all_complete_exactly_when_a_node_is_killed(
    make_cluster: ClusterFactory, session: aiohttp.ClientSession, record: Record
) -> None:
    cluster = await make_cluster(tokens_per_s=10)
    tokens = 60  # 6 s at 10 tokens/s
    jobs = [await submit(session, cluster.url, tokens) for _ in range(50)]
    clients = [
        ResumingClient(session, f"{cluster.url}{job['events_url']}?last_event_id=0") for job in jobs for _ in range(4)
    ]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        # Every client is streaming and a sixth of the tokens are out: the kill lands mid-generation for all.
        await until(
            lambda: all(sum(e.event == "token" for e in c.events) >= tokens // 6 for c in clients),
            "every client streaming",
            timeout_s=40,
        )
        open_streams = [await metric(session, n, "hub_connections_open") for n in cluster.nodes]
        assert sum(open_streams) == len(clients), open_streams
        victim = cluster.nodes[open_streams.index(max(open_streams))]
        survivors = [n for n in cluster.nodes if n is not victim]
        before = await _resumes(session, survivors)
        killed = time.monotonic()
        cluster.kill(victim)
        await until(
            lambda: (
                sum(any(a.sent > killed and a.status == 200 for a in c.attempts) for c in clients) >= max(open_streams)
            ),
            "the killed node's clients streaming again",
        )
        # Where the live nodes found what the moved clients had missed: their own window of a channel they were
        # already tailing for other clients, or a read of the store.
        after = await _resumes(session, survivors)
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise
    channels = {
        job["channel"]: [(e.id, e.event, e.data) for e in await cluster.entries(job["channel"])] for job in jobs
    }
    per_client = [channels[job["channel"]] for job in jobs for _ in range(4)]
    counts = _accounting(clients, per_client)
    moved = [c for c in clients if any(a.sent > killed and a.status == 200 for a in c.attempts)]
    resumes = sorted(r.first_event - killed for c in moved if (r := _after_kill(c, killed)[1]).first_event is not None)
    failed = [a for c in clients for a in _failed_after(c, killed)]
    # Requests nginx sent to the dead node first and then, the connection refused, to a live one (its log lists
    # both upstreams): least_conn prefers the dead node right after the kill, as its count of open streams fell to 0.
    dead = f"127.0.0.1:{victim.port}"
    passed_over = [line for line in cluster.lb.access_log() if f"upstream={dead}, " in line]
    record(
        "kill_node_200_clients",
        {
            "clients": len(clients),
            "generations": len(jobs),
            "clients_on_killed_node": int(max(open_streams)),
            "clients_reconnected": len(moved),
            "time_to_resume_s": {
                "p50": round(statistics.median(resumes), 4) if resumes else None,
                "max": round(resumes[-1], 4) if resumes else None,
            },
            "failed_reconnects": len(failed),
            "reconnects_passed_over_dead_node": len(passed_over),
            "resumes_served_from": {k: after[k] - before[k] for k in after},
            **counts,
        },
    )
    for job in jobs:
        assert [e[1] for e in channels[job["channel"]]] == ["start"] + ["token"] * tokens + ["done"]
    for c, want in zip(clients, per_client, strict=True):
        assert [(e.id, e.event, e.data) for e in c.events] == want, c.attempts
    assert len(moved) == max(open_streams)
    assert failed == []
    assert passed_over, "no reconnect met the dead node: proxy_next_upstream was not exercised"
