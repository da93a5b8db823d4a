"""`--publish-replicas`: a write is answered only once replicas hold it, on a real primary and replica.

A replica that stops confirming (SIGSTOP: connected, silent) makes every write a 503 `not_replicated`, stored on the
primary but not answered as safe; a retry with the same idempotency key stores nothing twice and is answered once the
replica holds the first write.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import pytest

from hub.settings import HubSettings
from producer.settings import ProducerSettings
from ssecore.backend import AppendBatch, Fence, Idempotency, NewEvent, NotReplicated
from ssecore.backend_redis import RedisBackend
from ssecore.jobs import Job
from ssecore.queue_redis import RedisJobQueue
from tests.support import HubProcess, RedisServer, wait_http_ok

_WAIT_S = 0.3


class Replicated:
    """A primary and one replica of it, synced."""

    def __init__(self) -> None:
        self.primary = RedisServer("--repl-diskless-sync-delay", "0")
        self.replica = RedisServer("--replicaof", "127.0.0.1", "0")  # the port is set on start

    def start(self) -> None:
        self.primary.start()
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica.start()
        deadline = time.monotonic() + 30
        # Ready once WAIT counts the replica: for up to a second after its sync, until its first acknowledgement,
        # the primary holds the stream back and WAIT counts nothing.
        while True:
            cmd = ["redis-cli", "-p", str(self.primary.port)]
            wait = subprocess.run(cmd, input="SET ready 1\nWAIT 1 200\n", capture_output=True, text=True, timeout=10)
            if wait.stdout.split()[-1:] == ["1"]:
                break
            assert time.monotonic() < deadline, "the replica did not sync"

    @staticmethod
    def cli(port: int, *args: str) -> str:
        cmd = ["redis-cli", "-p", str(port), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    @contextmanager
    def replica_silent(self) -> Iterator[None]:
        """The replica stays connected but confirms nothing (stopped), until the block ends."""
        assert self.replica.proc is not None
        os.kill(self.replica.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.replica.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.replica.close()
        self.primary.close()


@pytest.fixture
def replicated() -> Iterator[Replicated]:
    servers = Replicated()
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


def _backend(servers: Replicated, prefix: str = "r:") -> RedisBackend:
    return RedisBackend(
        servers.primary.url, prefix=prefix, history=100, ttl_s=60, timeout_s=3, replicas=1, replicas_timeout_s=_WAIT_S
    )


def _length(servers: Replicated, port: int, channel: str) -> int:
    return int(servers.cli(port, "xlen", f"r:ch:{{{channel}}}"))


async def test_a_write_no_replica_confirms_is_refused_and_its_retry_stores_it_once(replicated: Replicated) -> None:
    backend = _backend(replicated)
    key = Idempotency("k1", "f1")
    try:
        # Confirmed: answered, and the replica holds it by then.
        await backend.append("c", [NewEvent("message", "zero")])
        assert _length(replicated, replicated.replica.port, "c") == 1
        with replicated.replica_silent():
            started = time.monotonic()
            with pytest.raises(NotReplicated):
                await backend.append_once("c", [NewEvent("message", "one")], key)
            assert time.monotonic() - started >= _WAIT_S * 0.9  # it waited for the replica, then gave up
            with pytest.raises(NotReplicated):
                await backend.append("c", [NewEvent("message", "two")])
            # A worker's appends (coalesced, fenced) are refused the same way, each batch on its own.
            fence = Fence("job", 1, take=True)
            [result] = await backend.append_many([AppendBatch("g", [NewEvent("token", "t")], fence=fence)])
            assert isinstance(result, NotReplicated)
            # Stored on the primary all the same: not lost, not yet safe.
            assert _length(replicated, replicated.primary.port, "c") == 3
        # The retry, once the replica is back, appends nothing and answers the first write's ids.
        again = await backend.append_once("c", [NewEvent("message", "one")], key)
        assert again.replayed
        assert _length(replicated, replicated.primary.port, "c") == 3
        assert _length(replicated, replicated.replica.port, "c") == 3
    finally:
        await backend.aclose()


async def test_concurrent_publishes_share_one_wait(replicated: Replicated) -> None:
    """Publishes made together leave in one write on the hub's connection and wait for the replica once, not once
    each: WAIT blocks its connection, so a WAIT per publish would make them wait one after another."""
    backend = _backend(replicated)
    try:
        await backend.append("warm", [NewEvent("message", "up")])
        before = _waits(replicated)
        results = await asyncio.gather(*(backend.append(f"c{i}", [NewEvent("message", "x")]) for i in range(50)))
        assert all(len(ids) == 1 for ids in results)
        assert _waits(replicated) - before <= 2
    finally:
        await backend.aclose()


def _waits(servers: Replicated) -> int:
    stats = servers.cli(servers.primary.port, "info", "commandstats")
    line = next((x for x in stats.splitlines() if x.startswith("cmdstat_wait:")), "cmdstat_wait:calls=0,")
    return int(line.split("calls=")[1].split(",")[0])


async def test_a_retry_on_another_connection_is_answered_only_once_the_first_write_is_replicated(
    replicated: Replicated,
) -> None:
    """The retry of a refused publish often reaches another node, whose connection's last write is older. Its answer
    must wait for the replicas to hold the first write, which it only read, not just its own last write."""
    first, other = _backend(replicated), _backend(replicated)
    key = Idempotency("k2", "f2")
    try:
        # The other node's connection wrote before, and the replica confirmed it: its last write is older than the
        # first append will be.
        await other.append("elsewhere", [NewEvent("message", "earlier")])
        with replicated.replica_silent():
            with pytest.raises(NotReplicated):
                await first.append_once("c", [NewEvent("message", "one")], key)
            with pytest.raises(NotReplicated):
                await other.append_once("c", [NewEvent("message", "one")], key)
        assert (await other.append_once("c", [NewEvent("message", "one")], key)).replayed
        assert _length(replicated, replicated.replica.port, "c") == 1
    finally:
        await first.aclose()
        await other.aclose()


async def test_a_submitted_generation_is_refused_until_a_replica_holds_it(replicated: Replicated) -> None:
    queue = RedisJobQueue(
        replicated.primary.url, prefix="r:", group="g", record_ttl_s=60, replicas=1, replicas_timeout_s=_WAIT_S
    )
    job = Job(id="gen1", channel="gen:gen1", provider="demo", model="demo", messages=[], owner="ip:x")
    try:
        with replicated.replica_silent(), pytest.raises(NotReplicated):
            await queue.submit(job)
        await queue.submit(Job(id="gen2", channel="gen:gen2", provider="demo", model="demo", messages=[], owner="ip:x"))
        assert replicated.cli(replicated.replica.port, "exists", "r:gen:{gen2}") == "1"
    finally:
        await queue.aclose()


@pytest.mark.e2e
async def test_a_publish_no_replica_confirms_is_a_503_not_replicated_and_its_retry_a_201(
    replicated: Replicated,
) -> None:
    hub = HubProcess(
        "--redis-url",
        replicated.primary.url,
        "--publish-replicas",
        "1",
        "--publish-replicas-timeout",
        str(_WAIT_S),
    )
    try:
        hub.start()
        url = f"{hub.url}/v1/channels/d/events"
        headers = {"Idempotency-Key": "p1"}
        async with aiohttp.ClientSession() as session:
            await wait_http_ok(session, f"{hub.url}/readyz", why=hub.log)
            with replicated.replica_silent():
                async with session.post(url, json=[{"data": "x"}], headers=headers) as resp:
                    body = await resp.json()
                    assert resp.status == 503, body
                    assert body["error"] == "not_replicated"
                    assert resp.headers["Retry-After"] == "1"
            async with session.post(url, json=[{"data": "x"}], headers=headers) as resp:
                assert resp.status == 201, await resp.text()
                assert resp.headers.get("Idempotent-Replayed") == "true"
        assert int(replicated.cli(replicated.replica.port, "xlen", "hub:ch:{d}")) == 1
    finally:
        hub.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--publish-replicas", "1"], "--publish-replicas (HUB_PUBLISH_REPLICAS): needs Redis"),
        (
            ["--redis-url", "redis://h:1/0", "--redis-cluster", "--publish-replicas", "1"],
            "is not supported with --redis-cluster",
        ),
        (
            ["--redis-url", "redis://h:1/0", "--publish-replicas", "1", "--publish-replicas-timeout", "3"],
            "--publish-replicas-timeout (HUB_PUBLISH_REPLICAS_TIMEOUT): must be less than",
        ),
        (["--redis-url", "redis://h:1/0", "--publish-replicas", "-1"], "must be 0-16"),
    ],
)
def test_replica_settings_that_cannot_work_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HubSettings.from_args(args, {})


def test_a_worker_takes_the_same_replica_settings() -> None:
    s = ProducerSettings.from_args(
        ["--redis-url", "redis://h:1/0"], {"PRODUCER_PUBLISH_REPLICAS": "1", "PRODUCER_PUBLISH_REPLICAS_TIMEOUT": "2"}
    )
    assert (s.publish_replicas, s.publish_replicas_timeout_s) == (1, 2.0)
    with pytest.raises(ValueError, match="PRODUCER_PUBLISH_REPLICAS_TIMEOUT"):
        ProducerSettings.from_args(
            ["--redis-url", "redis://h:1/0", "--publish-replicas", "1", "--publish-replicas-timeout", "9"], {}
        )
    # Without replicas to wait for, the timeout is not held to the deadline: a short --redis-timeout stays valid.
    assert (
        HubSettings.from_args(
            ["--redis-url", "redis://h:1/0", "--redis-timeout", "1", "--anonymous"], {}
        ).publish_replicas
        == 0
    )
