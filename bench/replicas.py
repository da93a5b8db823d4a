"""Replication cost: what `--publish-replicas 1` (every write answered only once a replica holds it) costs a publish
and a worker's token, against `--publish-replicas 0`, in one run.

Starts its own redis-server primary and one replica of it, then two hub nodes on the primary (N=0 and N=1) and two
workers (N=0 and N=1, demo provider at a model's pace), all on loopback. Per round, each mode in turn (the order
alternates, so neither always runs second on a noisy machine): HTTP publishes from this process, one publisher in
sequence and then many at once, and the same appends made by this process straight to the store, as a hub node makes
them; then, in rounds of their own, many concurrent generations submitted straight to the job queue. Each figure is
the median over the rounds. Bounded; stops everything it started, by PID. Prints a Markdown report
(also written to --out).

    python bench/replicas.py --out bench/results-replicas.md
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Report, cpu_seconds  # noqa: E402
from bench.run import HUB_LOAD_FLAGS  # noqa: E402
from ssecore.backend import NewEvent  # noqa: E402
from ssecore.backend_redis import RedisBackend  # noqa: E402
from ssecore.jobs import Job, new_generation_id  # noqa: E402
from ssecore.queue_redis import RedisJobQueue  # noqa: E402
from tests.processes import RedisServer, Service, free_port  # noqa: E402

MODES = (0, 1)
_REPLICA_SYNC_S = 30.0
_READY_S = 30.0
_GENERATION_SLACK_S = 60.0  # past the ideal duration of a round of generations, before the bench gives up
_WARMUP_PUBLISHES = 100
_FINISHED = 'producer_generations_finished_total{outcome="done",provider="demo"}'


def pct(values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0-1) of `values`."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Figures:
    """Per mode, per figure, one value per round."""

    rounds: dict[int, dict[str, list[float]]] = field(default_factory=lambda: {n: {} for n in MODES})

    def add(self, mode: int, name: str, value: float) -> None:
        self.rounds[mode].setdefault(name, []).append(value)

    def median(self, mode: int, name: str) -> float:
        return statistics.median(self.rounds[mode][name])


# -- the servers ------------------------------------------------------------------------------------------------------


@dataclass
class Servers:
    primary: RedisServer
    replica: RedisServer
    primary_url: str
    hubs: dict[int, Service]  # by mode
    hub_urls: dict[int, str]
    workers: dict[int, Service]
    worker_ports: dict[int, int]  # their metrics
    redis_version: str


def cpu_now(servers: Servers, pid: int, *, client: bool) -> dict[str, float]:
    """CPU seconds so far of process `pid` (the hub or worker measured), the two Redis servers and, with `client`,
    this process."""
    pids = {"node": pid, "primary": servers.primary.pid, "replica": servers.replica.pid}
    cpu = {name: cpu_seconds(p) for name, p in pids.items()}
    return cpu | ({"client": time.process_time()} if client else {})


def add_cpu(figures: Figures, n: int, what: str, before: dict[str, float], after: dict[str, float], per: float) -> None:
    """Each process's CPU from `before` to `after`, and all of theirs together, divided by `per`."""
    for name in before:
        figures.add(n, f"{name}_cpu_{what}", (after[name] - before[name]) / per)
    figures.add(n, f"all_cpu_{what}", (sum(after.values()) - sum(before.values())) / per)


def _redis(stack: ExitStack, work: Path, name: str, *extra: str) -> RedisServer:
    server = RedisServer(*extra, directory=work / name, own_session=True)
    stack.callback(server.stop)
    server.start()
    return server


async def _replica_counted(url: str) -> str:
    """Until WAIT counts the replica: for up to a second after its sync, until its first acknowledgement, the primary
    holds the replication stream back and WAIT counts nothing. Returns the server's version."""
    r = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        deadline = time.monotonic() + _REPLICA_SYNC_S
        while True:
            await r.set("bench:ready", 1)
            if await r.wait(1, 200) >= 1:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("the replica did not sync")
        info = await r.info("server")
        return str(info["redis_version"])
    finally:
        await r.aclose()


async def _ready(session: aiohttp.ClientSession, service: Service, url: str) -> None:
    deadline = time.monotonic() + _READY_S
    while time.monotonic() < deadline:
        if not service.running():
            raise RuntimeError(f"{service.name} exited before it was ready:\n{service.log_tail()}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{service.name} not ready at {url}:\n{service.log_tail()}")


def start(stack: ExitStack, work: Path, args: argparse.Namespace) -> Servers:
    primary = _redis(stack, work, "primary", "--repl-diskless-sync-delay", "0")
    replica = _redis(stack, work, "replica", "--replicaof", "127.0.0.1", str(primary.port))
    url = primary.url
    version = asyncio.run(_replica_counted(url))
    servers = Servers(primary, replica, url, {}, {}, {}, {}, version)
    for n in MODES:
        hport, mport = free_port(), free_port()
        hub = Service(
            f"hub{n}",
            [sys.executable, "-m", "hub", "--redis-url", url, "--port", str(hport), "--publish-replicas", str(n)]
            + [*HUB_LOAD_FLAGS, "--embedded-worker", "off", "--log-level", "warning"],
            work / f"hub{n}.log",
            cwd=ROOT,
            own_session=True,
        )
        worker = Service(
            f"worker{n}",
            [sys.executable, "-m", "producer", "--redis-url", url, "--key-prefix", f"w{n}:"]
            + ["--publish-replicas", str(n), "--demo-tokens-per-s", str(args.tokens_per_s)]
            + ["--concurrency", str(args.generations), "--metrics-port", str(mport), "--log-level", "warning"],
            work / f"worker{n}.log",
            cwd=ROOT,
            own_session=True,
        )
        for s in (hub, worker):
            stack.callback(s.stop)
            s.start()
        servers.hubs[n], servers.hub_urls[n] = hub, f"http://127.0.0.1:{hport}"
        servers.workers[n], servers.worker_ports[n] = worker, mport
    return servers


# -- publishes --------------------------------------------------------------------------------------------------------


async def _publish(session: aiohttp.ClientSession, url: str, errors: list[int]) -> float:
    t0 = time.perf_counter()
    async with session.post(url, json={"event": "token", "data": "benchmark"}) as r:
        await r.read()
        if r.status != 201:
            errors.append(r.status)
    return time.perf_counter() - t0


async def sequential(session: aiohttp.ClientSession, base: str, count: int, errors: list[int]) -> list[float]:
    url = f"{base}/v1/channels/seq/events"
    return [await _publish(session, url, errors) for _ in range(count)]


async def concurrent(
    session: aiohttp.ClientSession, base: str, publishers: int, duration_s: float, errors: list[int]
) -> tuple[list[float], float]:
    """`publishers` publishing at once, each on its own channel, each its next as soon as the last is answered."""
    deadline = time.perf_counter() + duration_s

    async def one(i: int) -> list[float]:
        url = f"{base}/v1/channels/conc{i}/events"
        out: list[float] = []
        while time.perf_counter() < deadline:
            out.append(await _publish(session, url, errors))
        return out

    t0 = time.perf_counter()
    per = await asyncio.gather(*(one(i) for i in range(publishers)))
    return [x for xs in per for x in xs], time.perf_counter() - t0


async def publish_round(
    session: aiohttp.ClientSession, servers: Servers, n: int, args: argparse.Namespace, figures: Figures
) -> None:
    base, pid = servers.hub_urls[n], servers.hubs[n].pid
    errors: list[int] = []
    lat = await sequential(session, base, args.sequential, errors)
    figures.add(n, "seq_p50", pct(lat, 0.5))
    figures.add(n, "seq_p99", pct(lat, 0.99))
    cpu0 = cpu_now(servers, pid, client=True)
    lat, elapsed = await concurrent(session, base, args.publishers, args.publish_s, errors)
    cpu1 = cpu_now(servers, pid, client=True)
    add_cpu(figures, n, "pub", cpu0, cpu1, len(lat) / 1000)
    figures.add(n, "busy_pub", (sum(cpu1.values()) - sum(cpu0.values())) / elapsed)
    figures.add(n, "conc_rate", len(lat) / elapsed)
    figures.add(n, "conc_p50", pct(lat, 0.5))
    figures.add(n, "conc_p99", pct(lat, 0.99))
    figures.add(n, "pub_errors", len(errors))


async def backend_round(servers: Servers, n: int, args: argparse.Namespace, figures: Figures) -> None:
    """Appends through a RedisBackend of this process, as a hub node makes them, without HTTP: what replication costs
    the store's side alone, on one connection (a node sends all its publishes on one)."""
    backend = RedisBackend(servers.primary_url, prefix=f"b{n}:", history=1000, ttl_s=600, replicas=n)
    event = [NewEvent("token", "benchmark")]
    try:
        for _ in range(_WARMUP_PUBLISHES):
            await backend.append("warm", event)
        lat = []
        for _ in range(args.sequential):
            t0 = time.perf_counter()
            await backend.append("seq", event)
            lat.append(time.perf_counter() - t0)
        figures.add(n, "be_seq_p50", pct(lat, 0.5))
        deadline = time.perf_counter() + args.publish_s / 2

        async def one(i: int) -> int:
            count = 0
            while time.perf_counter() < deadline:
                await backend.append(f"conc{i}", event)
                count += 1
            return count

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(args.publishers)))
        figures.add(n, "be_rate", sum(counts) / (time.perf_counter() - t0))
    finally:
        await backend.aclose()


# -- generations ------------------------------------------------------------------------------------------------------


async def metric(session: aiohttp.ClientSession, port: int, name: str) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


async def _command_calls(admin: aioredis.Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "wait")}


async def generation_round(
    session: aiohttp.ClientSession, servers: Servers, n: int, args: argparse.Namespace, figures: Figures
) -> None:
    port, pid = servers.worker_ports[n], servers.workers[n].pid
    admin = aioredis.Redis.from_url(servers.primary_url, decode_responses=True)
    queue = RedisJobQueue(
        servers.primary_url, prefix=f"w{n}:", group="producers", record_ttl_s=3600, replicas=n, replicas_timeout_s=1
    )
    ids = [new_generation_id() for _ in range(args.generations)]
    model = f"demo:{args.tokens}"
    jobs = [Job(id=gid, provider="demo", model=model, messages=[], channel=f"gen:{gid}") for gid in ids]
    try:
        finished0 = await metric(session, port, _FINISHED)
        trips0 = await metric(session, port, "producer_append_round_trips_total")
        calls0, cpu0 = await _command_calls(admin), cpu_now(servers, pid, client=False)
        # Spread over --submit-s, as users' requests come: submitted back to back, all generations would make their
        # tokens in the same instants (and N=1, slower to submit, would spread them more), not at a steady pace.
        submits, start = [], time.perf_counter()
        for i, j in enumerate(jobs):
            await asyncio.sleep(max(0.0, start + i * args.submit_s / len(jobs) - time.perf_counter()))
            t0 = time.perf_counter()
            await queue.submit(j)
            submits.append(time.perf_counter() - t0)
        ideal_s = args.tokens / args.tokens_per_s
        deadline = time.monotonic() + args.submit_s + ideal_s + _GENERATION_SLACK_S
        while await metric(session, port, _FINISHED) - finished0 < len(jobs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker{n} did not finish its generations in time")
            await asyncio.sleep(0.2)
        cpu = cpu_now(servers, pid, client=False)
        calls = await _command_calls(admin)
        trips = await metric(session, port, "producer_append_round_trips_total") - trips0
        excess = []
        for j in jobs:
            record = await queue.get(j.id)
            assert record is not None and record.started_at and record.finished_at, record
            excess.append(record.finished_at - record.started_at - ideal_s)
    finally:
        await queue.aclose()
        await admin.aclose()
    tokens = args.generations * args.tokens
    figures.add(n, "submit_p50", pct(submits, 0.5))
    add_cpu(figures, n, "tok", cpu0, cpu, tokens / 1e6)
    figures.add(n, "trips", trips / tokens)
    figures.add(n, "evalsha", (calls["evalsha"] - calls0["evalsha"]) / tokens)
    figures.add(n, "wait", (calls["wait"] - calls0["wait"]) / tokens)
    figures.add(n, "excess_p50", pct(excess, 0.5))
    figures.add(n, "excess_p99", pct(excess, 0.99))


def _orders(rounds: int) -> Iterator[tuple[int, ...]]:
    """The modes, in alternating order round by round."""
    for i in range(rounds):
        yield MODES if i % 2 == 0 else MODES[::-1]


async def measure(servers: Servers, args: argparse.Namespace) -> Figures:
    figures = Figures()
    limits = aiohttp.TCPConnector(limit=args.publishers * 2)
    async with aiohttp.ClientSession(connector=limits) as session:
        for n in MODES:
            await _ready(session, servers.hubs[n], f"{servers.hub_urls[n]}/readyz")
            await _ready(session, servers.workers[n], f"http://127.0.0.1:{servers.worker_ports[n]}/metrics")
            await sequential(session, servers.hub_urls[n], _WARMUP_PUBLISHES, [])
        for order in _orders(args.rounds):
            for n in order:
                await publish_round(session, servers, n, args, figures)
                await backend_round(servers, n, args, figures)
        for order in _orders(args.generation_rounds):
            for n in order:
                await generation_round(session, servers, n, args, figures)
    return figures


# -- the report -------------------------------------------------------------------------------------------------------

_ms: Callable[[float], str] = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
_per_1000: Callable[[float], str] = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
_us: Callable[[float], str] = lambda us: f"{us:.1f} µs"  # noqa: E731
_rate: Callable[[float], str] = lambda v: f"{v:,.0f}"  # noqa: E731
_ratio: Callable[[float], str] = lambda v: f"{v:.3f}"  # noqa: E731


def _rows(args: argparse.Namespace) -> list[tuple[str, str, Callable[[float], str]]]:
    per = f"{args.publishers} publishers at once"
    cpu_pub = "CPU per 1000 publishes (32 at once)"
    return [
        ("seq_p50", "publish latency, one publisher in sequence, p50", _ms),
        ("seq_p99", "publish latency, one publisher in sequence, p99", _ms),
        ("conc_rate", f"publishes/s, {per}", _rate),
        ("conc_p50", f"publish latency, {per}, p50", _ms),
        ("conc_p99", f"publish latency, {per}, p99", _ms),
        ("node_cpu_pub", f"hub {cpu_pub}", _per_1000),
        ("primary_cpu_pub", f"primary Redis {cpu_pub}", _per_1000),
        ("replica_cpu_pub", f"replica Redis {cpu_pub}", _per_1000),
        ("client_cpu_pub", f"bench client {cpu_pub}", _per_1000),
        ("all_cpu_pub", f"all four processes' {cpu_pub}", _per_1000),
        ("busy_pub", "cores the four kept busy, 32 at once (of 2, shared)", lambda v: f"{v:.2f}"),
        ("be_seq_p50", "hub's store only (no HTTP): append latency in sequence, p50", _ms),
        ("be_rate", f"hub's store only (no HTTP): appends/s on its one connection, {args.publishers} at once", _rate),
        ("submit_p50", "generation submit latency (job queue, in sequence), p50", _ms),
        ("node_cpu_tok", "worker CPU per token", _us),
        ("primary_cpu_tok", "primary Redis CPU per token", _us),
        ("replica_cpu_tok", "replica Redis CPU per token", _us),
        ("all_cpu_tok", "all three processes' CPU per token", _us),
        ("trips", "worker append round trips per token", _ratio),
        ("evalsha", "Redis EVALSHA per token", _ratio),
        ("wait", "Redis WAIT per token (appends and submits)", _ratio),
        ("excess_p50", "generation time past the ideal, p50 of generations", _ms),
        ("excess_p99", "generation time past the ideal, p99 of generations", _ms),
    ]


def tabulate(figures: Figures, args: argparse.Namespace, report: Report) -> None:
    """Medians per mode, their ratio, and the spread of the ratio between the two modes' runs of each round (which ran
    one after the other): how far the noise of the machine reaches."""
    report.add("| figure | N=0 | N=1 | N=1 / N=0 | per round |")
    report.add("|---|---|---|---|---|")
    for key, label, show in _rows(args):
        a, b = figures.median(0, key), figures.median(1, key)
        ratios = [y / x for x, y in zip(figures.rounds[0][key], figures.rounds[1][key], strict=True) if x]
        ratio = f"{b / a:.2f}" if a else "–"
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "–"
        report.add(f"| {label} | {show(a)} | {show(b)} | {ratio} | {spread} |")
    errors = {n: sum(figures.rounds[n]["pub_errors"]) for n in MODES}
    report.add()
    report.add(f"Publishes not answered 201: {errors[0]:g} with N=0, {errors[1]:g} with N=1.")


def conclude(figures: Figures, args: argparse.Namespace, report: Report) -> None:
    """What the figures mean, in their own numbers."""

    def m(n: int, key: str) -> float:
        return figures.median(n, key)

    def ratio(key: str) -> str:
        return f"{m(1, key) / m(0, key):.2f}x"

    def delta_ms(key: str) -> str:
        return f"{(m(1, key) - m(0, key)) * 1000:+.2f} ms"

    report.add()
    report.add(
        "What it means: N=1 adds a primary-to-replica acknowledgement to every write before it is answered: "
        f"{delta_ms('be_seq_p50')} per append at the store and {delta_ms('seq_p50')} per lone HTTP publish (p50) "
        "here on loopback, plus the network's round trip where the replica is on another machine. Under concurrent "
        "load a WAIT holds the connection it was sent on until the replica answers; a hub node sends its publishes "
        "on one connection, with one WAIT at the end of each write for every publish in it, so publishes that "
        f"arrive together wait together: {ratio('be_rate')} the appends/s at the store alone, the primary and the "
        f"replica spend {ratio('primary_cpu_pub')} and {ratio('replica_cpu_pub')} the CPU per publish, and end to "
        f"end {ratio('conc_rate')} the publishes/s on this machine. A worker's tokens hardly notice: one WAIT per "
        f"coalesced round trip of about {1 / m(1, 'trips'):.0f} tokens, {ratio('all_cpu_tok')} the CPU per token. "
        "Live subscribers see an event as soon as the primary stores it either way; N=1 holds only the writer's "
        "answer. Choose N=1 where an answered publish or generation must survive the loss of the primary (a failover "
        "to a replica); keep N=0 where a failover may lose the last moment of events and every fraction of a "
        "millisecond of publish latency counts."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="publish rounds per mode")
    ap.add_argument("--sequential", type=int, default=1000, help="publishes in sequence per round")
    ap.add_argument("--publishers", type=int, default=32)
    ap.add_argument("--publish-s", type=float, default=2.0, help="seconds of concurrent publishes per round")
    ap.add_argument("--generation-rounds", type=int, default=3, help="rounds of generations per mode")
    ap.add_argument("--generations", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--tokens-per-s", type=float, default=30.0)
    ap.add_argument("--submit-s", type=float, default=1.0, help="seconds a round's submits are spread over")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = Report([])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    work = Path(tempfile.mkdtemp(prefix="replicas-bench-"))
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            servers = start(stack, work, args)
            figures = asyncio.run(measure(servers, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = " ".join(["python", "bench/replicas.py", *sys.argv[1:]])
    report.add(f"# Replication cost: `--publish-replicas` 0 and 1, {when}")
    report.add()
    report.add(
        f"Command: `{command}` at commit {commit.stdout.strip() or '?'}, "
        f"{time.monotonic() - started:.0f} s. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, Redis {servers.redis_version}: a primary and one replica, a hub node "
        f"and a worker per mode, all on loopback. Publishes: from one aiohttp client process, {args.sequential} in "
        f"sequence, then {args.publishers} publishers for {args.publish_s:g} s, {args.rounds} rounds per mode. "
        f"Generations: {args.generations} at once of {args.tokens} tokens at {args.tokens_per_s:g} tokens/s each "
        f"({args.generations * args.tokens_per_s:,.0f} tokens/s together; ideal {args.tokens / args.tokens_per_s:g} s "
        f"each), demo provider, coalescing on, submitted straight to the job queue evenly over {args.submit_s:g} s, "
        f"{args.generation_rounds} rounds "
        "per mode. Modes alternate in order round by round; each figure is the median of its rounds."
    )
    report.add()
    tabulate(figures, args, report)
    conclude(figures, args, report)
    if args.out:
        args.out.write_text("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
