"""The soak harness: real processes, generations at random moments, every event of every generation checked.

Topology: one redis-server, two hub nodes (JWT authentication) and two workers, with the compressed timings of a test
(claims go stale after 3 s, renewed every 0.5 s). Demo generations of a few random tokens are submitted at random
moments, with idle gaps of several seconds among them: an idle worker is where a stalled fetch loop shows. Each
generation is followed from its first event over SSE, each reconnect going to the other node with `Last-Event-ID`.
With `kills`, a random hub node or worker is killed with SIGKILL every few seconds and started again a moment later.

Per generation it checks what a user relies on: it started soon after it was submitted (the Redis id of its first
`start` event against the record's `created_at`), the client got every stored event once with ids strictly
increasing, exactly one terminal event and nothing after it, the text after the last `reset` (a worker take-over) is
the whole answer, and the record ends `done`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import jwt
import orjson

from ssecore.backend import Entry
from ssecore.backend_redis import RedisBackend
from ssecore.demo import TEXT
from ssecore.sse import SSEEvent
from tests.support import (
    Attempt,
    HubProcess,
    ProducerProcess,
    RedisServer,
    ResumingClient,
    ServiceProcess,
    free_port,
    stored_entries,
    wait_http_ok,
)

__all__ = ["JobOutcome", "Soak", "SoakConfig", "SoakReport", "expected_text"]

_SECRET = "soak-secret-of-at-least-32-bytes-0123456789"
_PREFIX = "soak:"
_HUB_FLAGS = (
    "--jwt-secret",
    _SECRET,
    "--key-prefix",
    _PREFIX,
    "--heartbeat",
    "2",
    "--retry-ms",
    "250",
    "--grace",
    "2",
    # Every follower is one client (one token, one address): lift the per-client limits.
    "--max-streams-per-client",
    "100000",
    "--publish-rate",
    "100000",
    "--publish-burst",
    "100000",
    "--log-level",
    "warning",
)
_TERMINAL_EVENTS = ("done", "error")


def _worker_flags(tokens_per_s: float, metrics_port: int) -> tuple[str, ...]:
    return (
        "--key-prefix",
        _PREFIX,
        "--claim-idle",
        "3",
        "--renew",
        "0.5",
        "--poll",
        "0.25",
        "--grace",
        "1",
        "--metrics-port",
        str(metrics_port),
        "--demo-tokens-per-s",
        str(tokens_per_s),
        "--log-level",
        "info",
    )


def expected_text(tokens: int) -> str:
    """The demo's answer for model `demo:<tokens>`: its text word by word (each word with the space before it),
    cycled, without the leading space of the first word."""
    words = re.findall(r"\s*\S+", TEXT)
    return "".join(words[i % len(words)] for i in range(tokens)).lstrip()


def _tail(process: ServiceProcess) -> Callable[[], str]:
    return lambda: process.log()[-2000:]


def _id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class SoakConfig:
    duration_s: float = 30.0  # submissions stop after this; the run then waits for the generations still going
    kills: bool = False
    seed: int | None = None
    finish_timeout_s: float = 30.0  # after its submission, a generation not finished by then counts as unfinished
    max_tokens: int = 40  # each generation is demo:<1..max_tokens>
    tokens_per_s: float = 25.0
    kill_gap_s: tuple[float, float] = (4.0, 15.0)  # between one process coming back and the next kill
    down_s: tuple[float, float] = (0.5, 3.0)  # how long a killed process stays down


@dataclass(slots=True)
class JobOutcome:
    """What one generation's follower saw, checked against the channel as Redis stores it."""

    id: str
    tokens: int
    start_latency_s: float | None = None  # None: never started
    finished: bool = False  # the follower got the channel's end (a 204 after the terminal event) in time
    status: str | None = None  # the record's, at the end
    delivered: int = 0
    lost: int = 0  # stored events the follower never got
    duplicated: int = 0  # events it got more than once
    terminals: int = 0
    restarts: int = 0  # `reset` events with reason "restarted": worker take-overs
    connections: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class SoakReport:
    config: SoakConfig
    seed: int
    jobs: list[JobOutcome] = field(default_factory=list)
    submit_unknown: int = 0  # a POST cut by a kill: it may or may not have made a generation, so it is not checked
    submit_errors: list[str] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    per_worker: list[int | None] = field(default_factory=list)  # generations each ran since it last started
    wall_s: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return sorted(j.start_latency_s for j in self.jobs if j.start_latency_s is not None)

    def percentile(self, q: float) -> float | None:
        lat = self.latencies
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    @property
    def never_started(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.start_latency_s is None]

    def started_late(self, bound_s: float) -> list[JobOutcome]:
        return [j for j in self.jobs if j.start_latency_s is None or j.start_latency_s > bound_s]

    @property
    def run(self) -> int:
        return sum(j.finished and j.status == "done" for j in self.jobs)

    @property
    def lost(self) -> int:
        return sum(j.lost for j in self.jobs)

    @property
    def duplicated(self) -> int:
        return sum(j.duplicated for j in self.jobs)

    @property
    def failed(self) -> list[JobOutcome]:
        """Generations that did not end exactly once, whole, with every event delivered once."""
        return [j for j in self.jobs if j.problems]

    def idle_workers(self) -> list[int]:
        """Workers that ran less than an eighth of the generations. Two workers blocked on the job stream are served
        in turn (Redis serves blocked readers first come, first served), so each runs about half; one that runs
        none has stopped taking jobs, though the other hides it from every start latency."""
        floor = max(1, len(self.jobs) // 8)
        return [i for i, n in enumerate(self.per_worker) if n is None or n < floor]

    def ok(self, *, strict: bool) -> bool:
        """Nothing lost, duplicated or unfinished. `strict` (a run without kills): also every generation started
        within 2 s and every worker took its share."""
        late = (self.started_late(2.0) or self.idle_workers()) if strict else []
        return bool(self.jobs) and not self.failed and not self.submit_errors and not late

    def format(self) -> str:
        def sec(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}s"

        c = self.config
        lines = [
            f"soak: {c.duration_s:.0f}s, kills {'on' if c.kills else 'off'}, seed {self.seed}, wall {self.wall_s:.1f}s",
            f"jobs submitted      {len(self.jobs) + self.submit_unknown}"
            + (f" ({self.submit_unknown} cut by a kill, not checked)" if self.submit_unknown else ""),
            f"jobs run            {self.run}",
            f"never started       {len(self.never_started)}",
            f"events delivered    {sum(j.delivered for j in self.jobs)}",
            f"lost                {self.lost}",
            f"duplicated          {self.duplicated}",
            f"start latency       p50 {sec(self.percentile(0.5))}  p99 {sec(self.percentile(0.99))}  "
            f"max {sec(self.latencies[-1] if self.latencies else None)}",
            f"started within 2s   {len(self.jobs) - len(self.started_late(2.0))}/{len(self.jobs)}",
            f"worker take-overs   {sum(j.restarts for j in self.jobs)}",
            f"runs per worker     {self.per_worker} (since each last started)",
            f"reconnects          {sum(max(0, j.connections - 2) for j in self.jobs)}",
            f"kills               {sum(self.kills.values())} "
            + "".join(f" {k} {n}" for k, n in sorted(self.kills.items())),
        ]
        if not c.kills and self.idle_workers():
            lines.append(f"NOT TAKING JOBS     workers {self.idle_workers()} ran under an eighth of the generations")
        if self.submit_errors:
            lines.append(f"submit errors       {len(self.submit_errors)}: {self.submit_errors[:3]}")
        for j in self.failed[:10]:
            lines.append(f"FAILED {j.id} (demo:{j.tokens}): {'; '.join(j.problems)}")
        if len(self.failed) > 10:
            lines.append(f"... and {len(self.failed) - 10} more failed")
        return "\n".join(lines)


class _NodeSwitchingClient(ResumingClient):
    """A ResumingClient that goes to the next node on each reconnect, as a client behind a balancer may."""

    def __init__(self, session: aiohttp.ClientSession, nodes: list[str], path: str, **kwargs: object) -> None:
        super().__init__(session, nodes[0] + path, **kwargs)  # type: ignore[arg-type]
        self._urls = itertools.cycle([n + path for n in nodes])

    async def _connect(self, attempt: Attempt) -> None:
        self.url = next(self._urls)
        await super()._connect(attempt)


def check(tokens: int, events: list[SSEEvent], entries: list[Entry], record: dict[str, object] | None) -> JobOutcome:
    """Check one generation's events as a client got them against the channel's stored entries and its record."""
    out = JobOutcome(str(record["id"]) if record else "?", tokens, delivered=len(events))
    ids = [e.id for e in events]
    out.duplicated = len(ids) - len(set(ids))
    out.lost = len({e.id for e in entries} - set(ids))
    if out.duplicated:
        out.problems.append(f"{out.duplicated} events duplicated")
    if out.lost:
        out.problems.append(f"{out.lost} stored events never delivered")
    keys = [_id_key(i) if i else (-1, -1) for i in ids]
    if any(b <= a for a, b in itertools.pairwise(keys)):
        out.problems.append("ids not strictly increasing")
    starts = [e for e in entries if e.event == "start"]
    if starts and record is not None and isinstance(created := record.get("created_at"), float | int):
        out.start_latency_s = _id_key(starts[0].id)[0] / 1000 - created
    terminals = [i for i, e in enumerate(events) if e.event in _TERMINAL_EVENTS]
    out.terminals = len(terminals)
    if len(terminals) != 1:
        out.problems.append(f"{len(terminals)} terminal events")
    elif terminals[0] != len(events) - 1:
        out.problems.append("events after the terminal event")
    else:
        end = orjson.loads(events[-1].data)
        if events[-1].event != "done" or end.get("finish_reason") != "stop":
            out.problems.append(f"ended with {events[-1].event} {events[-1].data}")
    after = 0
    for i, e in enumerate(events):
        if e.event == "reset":
            reason = orjson.loads(e.data).get("reason")
            if reason != "restarted":
                out.problems.append(f"reset {reason!r}")
            out.restarts += reason == "restarted"
            after = i + 1
    text = "".join(orjson.loads(e.data)["text"] for e in events[after:] if e.event == "token")
    if terminals and text != expected_text(tokens):
        out.problems.append(f"text after the last reset is not the answer: {text[:60]!r}")
    status = record.get("status") if record else None
    out.status = str(status) if status is not None else None
    if status != "done":
        out.problems.append(f"record status {status}")
    return out


class Soak:
    """The processes of one soak run and the run itself; `close` ends every process it started."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.seed = config.seed if config.seed is not None else random.randrange(1 << 32)
        # One generator per loop, so that a seed gives the same submissions and the same kills whatever the timing.
        self.rng = random.Random(self.seed)  # submissions: gaps and sizes
        self._kill_rng = random.Random(self.seed + 1)
        self._node_rng = random.Random(self.seed + 2)  # which node a request goes to first
        self.redis = RedisServer()
        self.hubs: list[HubProcess] = []
        self.workers: list[ProducerProcess] = []
        self.metrics_ports: list[int] = []
        self.report = SoakReport(config, self.seed)
        self._backend: RedisBackend | None = None
        token = jwt.encode({"sub": "soak", "subscribe": ["gen:*"], "publish": ["gen:*"]}, _SECRET, algorithm="HS256")
        self._headers = {"Authorization": f"Bearer {token}"}

    # -- processes ----------------------------------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        await asyncio.to_thread(self.redis.start)
        common = ("--redis-url", self.redis.url)
        # Authentication on, as deployed: the environment must not switch the hub to anonymous mode.
        self.hubs = [HubProcess(*common, *_HUB_FLAGS, env={"HUB_ANONYMOUS": "false"}) for _ in range(2)]
        self.metrics_ports = [free_port() for _ in range(2)]
        self.workers = [
            ProducerProcess(*common, *_worker_flags(self.config.tokens_per_s, p)) for p in self.metrics_ports
        ]
        for hub in self.hubs:
            await asyncio.to_thread(hub.start)
        for worker in self.workers:
            worker.start()
        for hub in self.hubs:
            await wait_http_ok(session, f"{hub.url}/readyz", why=_tail(hub))
        self._backend = RedisBackend(self.redis.url, prefix=_PREFIX, history=10_000, ttl_s=3600, timeout_s=5)

    def logs(self, chars: int = 1500) -> str:
        parts = [f"--- hub {h.port}\n{h.log()[-chars:]}" for h in self.hubs]
        parts += [f"--- worker {i}\n{w.log()[-chars:]}" for i, w in enumerate(self.workers)]
        return "\n".join(parts)

    async def aclose(self) -> None:
        if self._backend is not None:
            await self._backend.aclose()
        for p in [*self.workers, *self.hubs]:
            p.close()
        self.redis.close()

    # -- the run ------------------------------------------------------------------------------------------------------

    async def run(self) -> SoakReport:
        started = time.monotonic()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, headers=self._headers) as session:
            await self.start(session)
            stop = asyncio.Event()
            killer = asyncio.create_task(self._kill_loop(session, stop)) if self.config.kills else None
            followers: list[asyncio.Task[JobOutcome]] = []
            try:
                await self._submit_loop(session, followers)
                self.report.jobs = list(await asyncio.gather(*followers))
                self.report.per_worker = [await _finished_count(session, p) for p in self.metrics_ports]
            finally:
                stop.set()
                if killer is not None:
                    await killer
                for t in followers:
                    t.cancel()
        self.report.wall_s = time.monotonic() - started
        return self.report

    def _gap_s(self) -> float:
        # Mostly a second or less, sometimes several seconds of idleness.
        return self.rng.uniform(3.0, 8.0) if self.rng.random() < 0.2 else self.rng.uniform(0.0, 1.0)

    async def _submit_loop(self, session: aiohttp.ClientSession, followers: list[asyncio.Task[JobOutcome]]) -> None:
        end = time.monotonic() + self.config.duration_s
        # A fresh deployment idles a while before its first job.
        gap = self.rng.uniform(5.0, 8.0)
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, gap))
            gap = self._gap_s()
            if time.monotonic() >= end:
                return
            tokens = self.rng.randint(1, self.config.max_tokens)
            job = await self._submit(session, tokens)
            if job is not None:
                deadline = time.monotonic() + self.config.finish_timeout_s
                followers.append(asyncio.create_task(self._follow(session, job, tokens, deadline)))

    async def _submit(self, session: aiohttp.ClientSession, tokens: int) -> dict[str, str] | None:
        body = {"provider": "demo", "model": f"demo:{tokens}", "messages": [{"role": "user", "content": "soak"}]}
        for _ in range(50):
            hub = self._node_rng.choice(self.hubs)
            try:
                async with session.post(f"{hub.url}/v1/generations", json=body) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status == 202:
                        return dict(answer)
                    if resp.status != 503:  # a node draining or without Redis for a moment: ask again
                        self.report.submit_errors.append(f"{resp.status} {answer}")
                        return None
            except aiohttp.ClientConnectorError:
                pass  # that node is down: nothing was sent
            except aiohttp.ClientError:
                self.report.submit_unknown += 1  # sent, then cut: a generation may exist, or not
                return None
            await asyncio.sleep(0.1)
        self.report.submit_errors.append("no node took the generation for 5 s")
        return None

    async def _follow(
        self, session: aiohttp.ClientSession, job: dict[str, str], tokens: int, deadline: float
    ) -> JobOutcome:
        nodes = [h.url for h in self.hubs]
        self._node_rng.shuffle(nodes)
        path = f"/v1/channels/{job['channel']}/events"
        client = _NodeSwitchingClient(session, nodes, path, last_event_id="0", retry_s=0.25, max_attempts=100_000)
        finished = True
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await client.run()
        except TimeoutError:
            finished = False
        record = await self._record(session, job["id"])
        assert self._backend is not None
        entries = await stored_entries(self._backend, job["channel"])
        out = check(tokens, client.events, entries, record)
        out.id, out.finished, out.connections = job["id"], finished, len(client.attempts)
        if not finished:
            out.problems.insert(0, f"not finished {self.config.finish_timeout_s:.0f}s after submission")
        return out

    async def _record(self, session: aiohttp.ClientSession, job_id: str) -> dict[str, object] | None:
        """The generation's record once settled (the worker writes it just after the terminal event), from any node
        that answers; the last one seen if it does not settle within a few seconds."""
        record: dict[str, object] | None = None
        for i in range(100):
            hub = self.hubs[i % len(self.hubs)]
            try:
                async with session.get(f"{hub.url}/v1/generations/{job_id}") as resp:
                    if resp.status == 200:
                        record = await resp.json()
                        if record is not None and record.get("status") not in ("queued", "running"):
                            return record
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        return record

    async def _kill_loop(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """kill -9 one random process at a time and start it again after a moment: nodes on their own port."""
        while True:
            try:
                async with asyncio.timeout(self._kill_rng.uniform(*self.config.kill_gap_s)):
                    await stop.wait()
                return
            except TimeoutError:
                pass
            victim: ServiceProcess = self._kill_rng.choice([*self.hubs, *self.workers])
            kind = "hub" if isinstance(victim, HubProcess) else "worker"
            assert victim.proc is not None
            victim.proc.kill()
            await asyncio.to_thread(victim.wait, 10)
            self.report.kills[kind] += 1
            await asyncio.sleep(self._kill_rng.uniform(*self.config.down_s))
            await asyncio.to_thread(victim.start)
            if isinstance(victim, HubProcess):
                await wait_http_ok(session, f"{victim.url}/readyz", why=_tail(victim))


async def _finished_count(session: aiohttp.ClientSession, port: int) -> int | None:
    """Generations a worker finished since it started, from its own /metrics; None if it does not answer."""
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return None
    return int(sum(float(v) for v in re.findall(r"^producer_generations_finished_total\{.*\} (\S+)$", text, re.M)))
