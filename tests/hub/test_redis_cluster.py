"""Hub nodes and a worker on a real three-master Redis Cluster: channels spread over the slots, and everything the
single-Redis tests prove (fan-out, resume on another node, generations, deletes) holds, with a bounded number of
connections from a node to each cluster node. The contract and API tests also run on the cluster (`backend_kind`)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import uuid
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from ssecore.backend import BackendUnavailable, NewEvent
from ssecore.backend_redis import RedisBackend
from tests.support import HubProcess, ProducerProcess, RedisClusterServers, collect, wait_http_ok

pytestmark = [pytest.mark.timeout(120), pytest.mark.e2e, pytest.mark.slow]

CHANNELS = 30
EVENTS = 10


@pytest.fixture
def processes(redis_cluster: RedisClusterServers) -> Iterator[tuple[HubProcess, HubProcess, ProducerProcess, str]]:
    prefix = f"rc{uuid.uuid4().hex[:8]}:"
    common = ("--redis-url", redis_cluster.url, "--redis-cluster", "--key-prefix", prefix)
    a = HubProcess(*common, "--embedded-worker", "off", "--log-level", "warning")
    b = HubProcess(*common, "--embedded-worker", "off", "--log-level", "warning")
    worker = ProducerProcess(*common, "--metrics-port", "0", "--demo-tokens-per-s", "100", "--log-level", "warning")
    try:
        for p in (a, b, worker):
            p.start()
        yield a, b, worker, prefix
    finally:
        for p in (a, b, worker):
            p.close()


async def _ready(session: aiohttp.ClientSession, node: HubProcess) -> None:
    await wait_http_ok(session, f"{node.url}/readyz", why=lambda: node.log()[-2000:])


def _connections_to(pid: int, ports: set[int]) -> dict[int, int]:
    """How many TCP connections process `pid` has open to each of `ports`."""
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True).stdout
    counts = dict.fromkeys(ports, 0)
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        peer = line.split()[3]
        port = int(peer.rsplit(":", 1)[1])
        if port in counts:
            counts[port] += 1
    return counts


async def test_fan_out_resume_generations_and_deletes_across_nodes_on_a_redis_cluster(
    redis_cluster: RedisClusterServers, processes: tuple[HubProcess, HubProcess, ProducerProcess, str]
) -> None:
    a, b, _worker, prefix = processes
    store = RedisBackend(redis_cluster.url, prefix=prefix, history=1000, ttl_s=600, cluster=True)
    async with aiohttp.ClientSession() as session:
        try:
            await _ready(session, a)
            await _ready(session, b)
            channels = [f"c{i}" for i in range(CHANNELS)]
            await store.ping()
            owners = {store._redis.get_node_from_key(store.keys.stream(c)).port for c in channels}
            assert owners == {s.port for s in redis_cluster.servers}  # the channels are spread over every master

            # Fan-out: two live subscribers per channel on node B; the events are published on node A.
            streams = [await session.get(f"{b.url}/v1/channels/{c}/events") for c in channels for _ in range(2)]
            assert {s.status for s in streams} == {200}
            published: dict[str, list[str]] = {}
            for c in channels:
                body = [{"event": "token", "data": f"{c}-{i}"} for i in range(EVENTS)]
                async with session.post(f"{a.url}/v1/channels/{c}/events", json=body) as resp:
                    assert resp.status == 201
                    published[c] = (await resp.json())["ids"]
            for i, s in enumerate(streams):
                got = [ev.id for ev in await collect(s, count=EVENTS)]
                assert got == published[channels[i // 2]]

            # Bounded: while B tails every channel, it holds few connections to each cluster node.
            per_node = _connections_to(b.proc.pid if b.proc else 0, {s.port for s in redis_cluster.servers})
            assert all(1 <= n <= 6 for n in per_node.values()), per_node
            print(f"node B's connections per cluster node while tailing {CHANNELS} channels: {per_node}")

            # Deleting a channel on A ends its streams on B with a reset.
            async with session.delete(f"{a.url}/v1/channels/c0") as resp:
                assert resp.status == 204
            for s in streams[:2]:
                [reset] = await collect(s)
                assert reset.event == "reset" and orjson.loads(reset.data)["reason"] == "deleted"
            for s in streams:
                s.close()

            # Resume on A from B's ids: exactly the rest.
            async with session.get(
                f"{a.url}/v1/channels/c1/events", headers={"Last-Event-ID": published["c1"][3]}
            ) as resp:
                assert [ev.id for ev in await collect(resp, count=EVENTS - 4)] == published["c1"][4:]

            # A generation submitted on A, run by the worker, streamed from B to its end.
            request = {"provider": "demo", "model": "demo:40", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"{a.url}/v1/generations", json=request) as resp:
                assert resp.status == 202
                job = await resp.json()
            async with session.get(f"{b.url}{job['events_url']}?last_event_id=0") as resp:
                events = await collect(resp, timeout_s=30)
            stored = (await store.range(job["channel"], "0", limit=1000)).entries
            assert [ev.id for ev in events] == [e.id for e in stored]
            assert stored[-1].close and sum(e.event == "token" for e in stored) >= 1
            deadline = time.monotonic() + 10
            while True:  # the worker settles the record just after the end marker
                async with session.get(f"{b.url}/v1/generations/{job['id']}") as resp:
                    status = (await resp.json())["status"]
                if status not in ("queued", "running") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert status == "done"
        finally:
            await store.aclose()
        assert not re.search(r"Traceback|ERROR", a.log() + b.log()), (a.log() + b.log())[-3000:]


def _move_slot(cluster: RedisClusterServers, slot: int, source: int, target: int, ports: list[int]) -> None:
    """Migrate one hash slot, keys included, from the master on `source` to the one on `target` (what a resharding
    does slot by slot), and tell every master."""
    cli = cluster.cli
    target_id, source_id = cli(target, "cluster", "myid"), cli(source, "cluster", "myid")
    cli(target, "cluster", "setslot", str(slot), "importing", source_id)
    cli(source, "cluster", "setslot", str(slot), "migrating", target_id)
    while keys := cli(source, "cluster", "getkeysinslot", str(slot), "100").split():
        migrate = ["migrate", "127.0.0.1", str(target), "", "0", "5000", "auth", cluster.PASSWORD, "keys", *keys]
        cli(source, *migrate)
    for port in ports:
        cli(port, "cluster", "setslot", str(slot), "node", target_id)


async def test_a_channel_whose_slot_moves_to_another_master_keeps_streaming_exactly(
    redis_cluster: RedisClusterServers,
) -> None:
    prefix = f"mv{uuid.uuid4().hex[:8]}:"
    node = HubProcess("--redis-url", redis_cluster.url, "--redis-cluster", "--key-prefix", prefix)
    store = RedisBackend(redis_cluster.url, prefix=prefix, history=1000, ttl_s=600, cluster=True)
    node.start()
    try:
        async with aiohttp.ClientSession() as session:
            await _ready(session, node)
            await store.ping()
            key = store.keys.stream("moving")
            slot = int(redis_cluster.cli(redis_cluster.servers[0].port, "cluster", "keyslot", key))
            ports = [s.port for s in redis_cluster.servers]
            source = store._redis.get_node_from_key(key).port
            target = next(p for p in ports if p != source)
            published: list[str] = []

            async def publish(n: int) -> None:
                body = [{"event": "token", "data": str(len(published) + i)} for i in range(n)]
                async with session.post(f"{node.url}/v1/channels/moving/events", json=body) as resp:
                    assert resp.status == 201, await resp.text()
                    published.extend((await resp.json())["ids"])

            await publish(3)
            stream = await session.get(f"{node.url}/v1/channels/moving/events?last_event_id=0")
            assert [ev.id for ev in await collect(stream, count=3)] == published
            await asyncio.to_thread(_move_slot, redis_cluster, slot, source, target, ports)
            for _ in range(5):  # through the move: the hub's client and its tail follow the slot to its new master
                await publish(2)
                await asyncio.sleep(0.2)
            got = [ev.id for ev in await collect(stream, count=10, timeout_s=20)]
            stream.close()
            assert got == published[3:]
            assert redis_cluster.cli(target, "cluster", "countkeysinslot", str(slot)) != "0"
            # The node's tail followed the slot: it listens for the channel's rings on the new master, not the old
            # one (it is not left to its periodic sweep, which would delay every event by up to --tail-block).
            assert redis_cluster.cli(source, "pubsub", "shardnumsub", key).split() == [key, "0"]
            assert redis_cluster.cli(target, "pubsub", "shardnumsub", key).split() == [key, "1"]
    finally:
        await store.aclose()
        node.close()


@pytest.fixture
def cluster_with_replicas() -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(masters=3, replicas=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.mark.parametrize("writer", ["node", "elsewhere"])
async def test_a_node_streams_on_after_the_master_of_its_channel_fails_over(
    cluster_with_replicas: RedisClusterServers, writer: str
) -> None:
    """kill -9 the master that holds a channel: its replica takes over, and the node, without a restart, learns the
    new slot map and streams on, exactly. The events are published through the node itself, or appended by another
    process (as workers do): then nothing but the node's own live tail can notice that its map is stale.
    (Replication is asynchronous: a failover may lose a master's last writes; here they reached the replica first.)"""
    cluster = cluster_with_replicas
    prefix = f"fo{uuid.uuid4().hex[:8]}:"
    node = HubProcess("--redis-url", cluster.url, "--redis-cluster", "--key-prefix", prefix, "--redis-timeout", "1")
    store = RedisBackend(cluster.url, prefix=prefix, history=1000, ttl_s=600, cluster=True, timeout_s=1)
    node.start()
    try:
        async with aiohttp.ClientSession() as session:
            await _ready(session, node)
            published: list[str] = []

            async def publish(text: str) -> bool:
                if writer == "elsewhere":
                    try:
                        published.extend(await store.append("x", [NewEvent("message", text)]))
                    except BackendUnavailable:
                        return False
                    return True
                async with session.post(f"{node.url}/v1/channels/x/events", json={"data": text}) as resp:
                    if resp.status == 201:
                        published.extend((await resp.json())["ids"])
                    return resp.status == 201

            assert await publish("before")
            stream = await session.get(f"{node.url}/v1/channels/x/events?last_event_id=0")
            assert [ev.id for ev in await collect(stream, count=1)] == published
            await store.ping()  # the store's client learns the slot map
            key = store.keys.stream("x")
            master = store._redis.get_node_from_key(key).port
            assert cluster.cli(master, "wait", "1", "2000") == "1"  # the replica has what the master had
            victim = next(s for s in cluster.servers if s.port == master)
            assert victim.proc is not None
            victim.proc.kill()
            victim.proc.wait()
            started = time.monotonic()
            while not await publish("after"):  # refused until a replica is promoted and the writer has learnt it
                assert time.monotonic() - started < 30, node.log()[-3000:]
                await asyncio.sleep(0.2)
            failover_s = time.monotonic() - started
            for i in range(3):
                assert await publish(f"more {i}")
            got = [ev.id for ev in await collect(stream, count=4, timeout_s=30)]
            delivered_s = time.monotonic() - started
            stream.close()
            assert got == published[1:]
            print(f"writes refused for {failover_s:.1f} s during the failover; all delivered {delivered_s:.1f} s after")
    finally:
        await store.aclose()
        node.close()
