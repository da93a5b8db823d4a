"""Job routing on real Redis: a job for a provider named in a providers file goes to the workers that have it, and
only to them, while the built-in providers' jobs go to any worker; a worker's claims (renew, release, ack, take-over)
on such a job stay on that provider's stream. Then the whole path: a hub and two `python -m producer` processes with
different providers files, each serving its own provider alone."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from ssecore.jobs import Delivery, Job, new_generation_id
from ssecore.queue_redis import RedisJobQueue
from tests.producer.fake_providers import DEFAULT_TOKENS, TEST_API_KEY, FakeProviders
from tests.support import (
    HubProcess,
    ProducerProcess,
    RedisClusterServers,
    RedisServer,
    ServiceProcess,
    collect,
    free_port,
)

BUILTINS = ("openai", "openai-responses", "anthropic", "gemini", "demo")  # what every worker has


def _job(provider: str, model: str = "m") -> Job:
    gid = new_generation_id()
    return Job(id=gid, provider=provider, model=model, messages=[{"role": "user", "content": "hi"}], channel=f"c:{gid}")


class Queues:
    """Queues of one deployment on one Redis: the hub's (it only submits) and workers' with the providers given."""

    def __init__(self, url: str, *, cluster: bool) -> None:
        self.url, self.cluster = url, cluster
        self.prefix = f"rt{uuid.uuid4().hex[:8]}:"
        self.made: list[RedisJobQueue] = []
        self.hub = self.worker()

    def worker(self, *named: str) -> RedisJobQueue:
        queue = RedisJobQueue(
            self.url,
            prefix=self.prefix,
            group="producers",
            record_ttl_s=600,
            cluster=self.cluster,
            providers=(*BUILTINS, *named),  # as producer/__main__.py passes a worker's providers
        )
        self.made.append(queue)
        return queue

    async def pending(self, stream: str) -> dict[str, str]:
        """Each pending entry's stream id -> the consumer holding it."""
        rows = await self.hub._redis.xpending_range(stream, "producers", min="-", max="+", count=100)
        return {r["message_id"]: r["consumer"] for r in rows}

    async def idle_ms(self, stream: str, stream_id: str) -> int:
        [row] = await self.hub._redis.xpending_range(stream, "producers", min=stream_id, max=stream_id, count=1)
        return int(row["time_since_delivered"])

    async def aclose(self) -> None:
        for queue in self.made:
            await queue.aclose()


@pytest.fixture(params=["redis", "cluster"])
async def queues(request: pytest.FixtureRequest) -> AsyncIterator[Queues]:
    server: RedisServer | RedisClusterServers = request.getfixturevalue(
        "redis_server" if request.param == "redis" else "redis_cluster"
    )
    made = Queues(server.url, cluster=request.param == "cluster")
    yield made
    await made.aclose()


@pytest.fixture
async def single(redis_server: RedisServer) -> AsyncIterator[Queues]:
    made = Queues(redis_server.url, cluster=False)
    yield made
    await made.aclose()


def _ids(deliveries: list[Delivery]) -> set[str]:
    return {d.job.id for d in deliveries}


async def test_a_named_providers_job_reaches_only_the_workers_that_have_it_and_a_built_in_one_any(
    queues: Queues,
) -> None:
    alpha_worker, beta_worker = queues.worker("alpha"), queues.worker("beta")
    alpha, beta, builtin = _job("alpha"), _job("beta"), _job("openai")
    for job in (alpha, beta, builtin):
        await queues.hub.submit(job)

    got_beta = await beta_worker.fetch("b", count=10, block_s=0.2)
    assert _ids(got_beta) <= {beta.id, builtin.id} and beta.id in _ids(got_beta)
    got_alpha = await alpha_worker.fetch("a", count=10, block_s=0.2)
    assert _ids(got_alpha) <= {alpha.id, builtin.id} and alpha.id in _ids(got_alpha)
    # The built-in job went to whichever asked first, once; the named ones to their own workers alone.
    assert sorted([*_ids(got_alpha), *_ids(got_beta)]) == sorted([alpha.id, beta.id, builtin.id])
    assert {d.entry_id.partition("/")[0] for d in got_alpha if d.job.id == alpha.id} == {"alpha"}

    # Later ones too, whoever asks first.
    later = [_job("gemini"), _job("alpha"), _job("demo")]
    for job in later:
        await queues.hub.submit(job)
    got = await beta_worker.fetch("b", count=10, block_s=0.2)
    assert _ids(got) == {later[0].id, later[2].id}
    assert _ids(await beta_worker.fetch("b", count=10, block_s=0.2)) == set()
    assert _ids(await alpha_worker.fetch("a", count=10, block_s=0.2)) == {later[1].id}
    # A worker that has neither named provider sees neither queue, the built-in one aside.
    await queues.hub.submit(_job("alpha"))
    assert await queues.worker().fetch("plain", count=10, block_s=0.2) == []


async def test_claims_on_a_named_job_stay_on_its_stream(single: Queues) -> None:
    """renew, release, claim_stale and ack on a named provider's entry act on that provider's stream; the built-in
    stream's entry beside it, held by the same worker, is left as it was."""
    q = single
    first, second, other = q.worker("alpha"), q.worker("alpha"), q.worker("beta")
    named, builtin = _job("alpha"), _job("demo")
    await q.hub.submit(named)
    await q.hub.submit(builtin)
    held = {d.job.id: d for d in await first.fetch("w1", count=10, block_s=0.2)}
    assert set(held) == {named.id, builtin.id}
    named_entry, builtin_entry = held[named.id].entry_id, held[builtin.id].entry_id
    alpha_stream, shared = q.hub.keys.provider_jobs("alpha"), q.hub.keys.jobs
    name, _, alpha_id = named_entry.partition("/")
    assert name == "alpha" and "/" not in builtin_entry
    assert await q.pending(alpha_stream) == {alpha_id: "w1"} and await q.pending(shared) == {builtin_entry: "w1"}

    # renew: the named entry's claim is fresh again, the built-in one's not touched.
    await asyncio.sleep(0.3)
    assert await first.renew("w1", [named_entry]) == []
    assert await q.idle_ms(alpha_stream, alpha_id) < 250 and await q.idle_ms(shared, builtin_entry) >= 300
    # Another worker renewing what it does not hold learns that it lost it, by the name it knows, and takes nothing.
    assert await second.renew("w2", [named_entry]) == [named_entry]
    assert await q.pending(alpha_stream) == {alpha_id: "w1"}

    # release: another alpha worker takes it over at once; a beta worker never does.
    await first.release("w1", [named_entry])
    assert await other.claim_stale("b", min_idle_s=60, count=10) == []
    [taken] = await second.claim_stale("w2", min_idle_s=60, count=10)
    assert (taken.job.id, taken.entry_id, taken.restarted) == (named.id, named_entry, True)
    assert await q.pending(alpha_stream) == {alpha_id: "w2"} and await q.pending(shared) == {builtin_entry: "w1"}

    # ack: gone from its stream; the built-in entry, of the same worker group, still pending and still there.
    await second.ack(taken.entry_id)
    assert await q.pending(alpha_stream) == {} and await q.hub._redis.xlen(alpha_stream) == 0
    assert await q.pending(shared) == {builtin_entry: "w1"} and await q.hub._redis.xlen(shared) == 1

    # claim_stale after idle: a worker that stopped renewing loses its named job to another alpha worker.
    stale = _job("alpha")
    await q.hub.submit(stale)
    [fetched] = await first.fetch("w1", count=10, block_s=0.2)
    await asyncio.sleep(0.6)
    assert await first.renew("w1", [builtin_entry]) == []  # the built-in one is kept fresh
    assert await other.claim_stale("b", min_idle_s=0.5, count=10) == []  # not its provider
    [taken] = await second.claim_stale("w2", min_idle_s=0.5, count=10)
    assert (taken.job.id, taken.entry_id, taken.restarted) == (stale.id, fetched.entry_id, True)
    assert await first.renew("w1", [fetched.entry_id, builtin_entry]) == [fetched.entry_id]
    assert await q.pending(shared) == {builtin_entry: "w1"}


# -- End to end: a hub and two worker processes with different providers files ----------------------------------------


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        p.close()


def _entry(fake: FakeProviders, worker: str, model: str) -> dict[str, Any]:
    # The same fake server behind both names; each worker's entry marks its requests, so the server tells them apart.
    return {
        "kind": "openai",
        "base_url": fake.base_url("openai"),
        "api_key_env": "FAKE_KEY",
        "headers": {"X-Worker": worker},
        "models": [model],
    }


def _file(directory: Path, name: str, entries: dict[str, Any]) -> str:
    path = directory / name
    path.write_bytes(orjson.dumps(entries))
    return str(path)


async def _metrics(session: aiohttp.ClientSession, port: int, *, until: str, timeout_s: float = 10) -> str:
    """A worker's /metrics, once they show `until`."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
        if until in text or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.05)


async def _generate(session: aiohttp.ClientSession, hub: HubProcess, provider: str, model: str) -> list[str]:
    body = {"provider": provider, "model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{hub.url}/v1/generations", json=body, headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 200, await resp.text()
        return [e.event for e in await collect(resp, timeout_s=30)]


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_two_workers_with_different_files_each_serve_only_their_own_provider(
    tmp_path: Path, redis_server: RedisServer, fake: FakeProviders, processes: list[ServiceProcess]
) -> None:
    alpha, beta = _entry(fake, "a", "alpha-model"), _entry(fake, "b", "beta-model")
    prefix = ("--redis-url", redis_server.url, "--key-prefix", f"e2e{uuid.uuid4().hex[:8]}:")
    # The hub knows every name; each worker only its own.
    hub = HubProcess(*prefix, "--providers-file", _file(tmp_path, "all.json", {"alpha": alpha, "beta": beta}))
    ports = {"a": free_port(), "b": free_port()}
    workers = {
        w: ProducerProcess(
            *prefix,
            "--providers-file",
            _file(tmp_path, f"{w}.json", {name: entry}),
            "--metrics-port",
            str(ports[w]),
            "--metrics-host",
            "127.0.0.1",
            "--poll",
            "0.1",
            env={"FAKE_KEY": TEST_API_KEY},
        )
        for w, name, entry in (("a", "alpha", alpha), ("b", "beta", beta))
    }
    for p in (hub, *workers.values()):
        processes.append(p)
        p.start()
    expected = ["start", *["token"] * len(DEFAULT_TOKENS), "done"]
    async with aiohttp.ClientSession() as session:
        # Several of each, so that a worker reading the other's queue would have had its chance.
        for _ in range(3):
            runs = await asyncio.gather(
                _generate(session, hub, "alpha", "alpha-model"), _generate(session, hub, "beta", "beta-model")
            )
            assert list(runs) == [expected, expected]
        # A worker counts a generation just after its channel closes: wait for the last ones.
        done = {"a": 'finished_total{outcome="done",provider="alpha"} 3.0', "b": 'provider="beta"} 3.0'}
        metrics = {w: await _metrics(session, port, until=done[w]) for w, port in ports.items()}

    # The provider server saw each worker's requests only for its own provider.
    served = {(r.model, r.headers["x-worker"], r.headers["authorization"]) for r in fake.requests}
    assert served == {("alpha-model", "a", f"Bearer {TEST_API_KEY}"), ("beta-model", "b", f"Bearer {TEST_API_KEY}")}
    assert len(fake.requests) == 6
    for w, mine, theirs in (("a", "alpha", "beta"), ("b", "beta", "alpha")):
        assert f'producer_generations_finished_total{{outcome="done",provider="{mine}"}} 3.0' in metrics[w]
        assert f'provider="{theirs}"' not in metrics[w]
        # Its start-up line names the providers it has: its own, and not the other's.
        started = next(line for line in workers[w].log().splitlines() if "started: concurrency" in line)
        has = started.rpartition("providers ")[2].split(", ")
        assert mine in has and theirs not in has, started
    assert hub.running() and all(p.running() for p in workers.values())


async def test_one_fetch_hands_out_no_more_jobs_than_asked_over_all_the_streams(queues: Queues) -> None:
    """XREADGROUP's COUNT is per stream: shared out, the streams together stay within the worker's free slots."""
    for _ in range(3):
        await queues.hub.submit(_job("alpha"))
        await queues.hub.submit(_job("openai"))
    worker = queues.worker("alpha")
    got = await worker.fetch("w1", 4, 0.1)
    assert len(got) == 4 and {d.job.provider for d in got} == {"alpha", "openai"}


async def test_a_record_without_a_message_is_stored_without_one(queues: Queues) -> None:
    """Nodes that predate messages build records from every stored field: a queued or running one must hold none."""
    record = await queues.hub.submit(_job("openai"))
    raw = await queues.hub._redis.hget(queues.hub.keys.record(record.id), "r")
    assert "message" not in orjson.loads(raw)


def test_a_key_prefix_with_braces_is_refused() -> None:
    """Braces make a hash tag of the prefix: on a cluster the job streams would not share the slot they need."""
    from hub.settings import HubSettings
    from producer.settings import ProducerSettings

    with pytest.raises(ValueError, match="--key-prefix .* must not contain"):
        HubSettings.from_args(["--anonymous", "--key-prefix", "{app}:"], {})
    with pytest.raises(ValueError, match="--key-prefix .* must not contain"):
        ProducerSettings.from_args(["--key-prefix", "app}"], {})


async def test_a_hubs_embedded_worker_on_redis_runs_its_files_providers(
    make_client: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with FakeProviders() as fake:
        path = tmp_path / "providers.json"
        path.write_bytes(orjson.dumps({"local": {"kind": "openai", "base_url": fake.base_url("openai")}}))
        hub = await make_client(
            None,
            redis_url=redis_server.url,
            key_prefix=f"ew{uuid.uuid4().hex[:8]}:",
            embedded_worker="on",
            providers_file=str(path),
        )
        body = {"provider": "local", "model": "normal", "messages": [{"role": "user", "content": "hi"}]}
        job = await (await hub.post("/v1/generations", json=body)).json()
        events = await collect(await hub.get(job["events_url"] + "?last_event_id=0"), timeout_s=20)
        assert [e.event for e in events] == ["start", *["token"] * len(DEFAULT_TOKENS), "done"]
        assert len(fake.requests_for("normal")) == 1
