"""Scenarios: what a run does, step by step, from the parent — which workers to spawn, when to start publishing, what
to wait for — and which figures it reports. `SCENARIOS` is the registry `python -m loadtest SCENARIO` looks names up in;
a new scenario is one more `@register` class here (and, if it needs a new kind of client, a role in `clients.py`).
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ssecore.settings import DEFAULT_HISTORY, DEFAULT_TTL_S

from .accounting import Histogram, StreamTotals
from .adapters import ADAPTERS
from .clients import FanoutPublishJob, GenerationsJob, PublishLoopsJob, SubscribeJob
from .probe import ProcSample, metrics_delta
from .report import Outcome, connection_figures, connection_rows, fmt_latency, hub_figures, hub_rows, latency_ms
from .runner import Run, WorkerHandle
from .settings import LoadSettings

__all__ = ["SCENARIOS", "Fanout", "Generations", "Idle", "Publish", "ReconnectStorm", "Scenario", "register"]

# File descriptors a worker needs besides its connections: the interpreter, pipes, the event loop, a resolver.
FD_SLACK = 64
# Time for spawned workers to import and start, on top of every wait for them.
_SPAWN_S = 30.0


class Scenario(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for --help
    defaults: ClassVar[Mapping[str, Any]] = {}  # LoadSettings fields this scenario defaults differently

    def check(self, settings: LoadSettings) -> None:  # noqa: B027 - a hook most scenarios do not need
        """Raise ValueError when the settings cannot run this scenario (a flag it needs is missing)."""

    def fds_per_worker(self, settings: LoadSettings) -> int:
        """File descriptors the busiest worker process needs (its connections, and the interpreter's own)."""
        return math.ceil(settings.connections / settings.client_workers) + FD_SLACK

    @abstractmethod
    async def run(self, run: Run) -> Outcome: ...


SCENARIOS: dict[str, type[Scenario]] = {}
S = TypeVar("S", bound=type[Scenario])


def register(cls: S) -> S:
    SCENARIOS[cls.name] = cls
    return cls


# -- shared steps ---------------------------------------------------------------------------------------------------


def spawn_subscribers(run: Run, channels: list[str]) -> list[WorkerHandle]:
    """N subscribers, subscriber i on channel i mod M at URL i mod U (from source address i mod A), dealt to the
    workers like cards so that every worker holds every channel and the workers' ramps add up to --ramp."""
    s = run.settings
    adapter = ADAPTERS[s.target]()
    streams = [
        (adapter.subscribe_url(s.urls[i % len(s.urls)], channels[i % len(channels)]), channels[i % len(channels)])
        for i in range(s.connections)
    ]
    # Subscriber i connects from source address i mod A: each address carries its share whatever the workers.
    sources = tuple(s.source_addresses[i % len(s.source_addresses)] for i in range(s.connections)) if (
        s.source_addresses) else ()  # fmt: skip
    w = s.client_workers
    jobs = [
        SubscribeJob(
            s.target, tuple(streams[k::w]), s.ramp_per_s / w, s.token, s.connect_timeout_s, tuple(sources[k::w])
        )
        for k in range(w)
    ]
    return run.spawn("subscribe", jobs)


def ramp_timeout_s(run: Run) -> float:
    s = run.settings
    return s.connections / s.ramp_per_s + s.connect_timeout_s + _SPAWN_S


async def finish_subscribers(
    run: Run, subs: list[WorkerHandle], expected: Mapping[str, int], timeout_s: float
) -> tuple[StreamTotals, ProcSample | None, dict[str, float] | None]:
    """Tell the subscribers what to expect and wait for it (or the timeout); sample the hub while the streams are
    still open; close them and sum the delivery records. Returns the records, the sample and the metrics scrape."""
    run.send(subs, "finish", {"expected": dict(expected), "timeout_s": timeout_s})
    await run.expect(subs, "drained", timeout_s + _SPAWN_S)
    sample = run.sample()
    metrics = await run.scrape()
    run.begin_phase("close")
    run.send(subs, "close")
    totals = StreamTotals()
    for part in await run.expect(subs, "done", ramp_timeout_s(run)):
        totals.merge(part)
    return totals, sample, metrics


def generations_job(run: Run, channels: list[str]) -> GenerationsJob:
    s = run.settings
    assert s.redis_url is not None
    return GenerationsJob(
        s.redis_url,
        s.key_prefix,
        DEFAULT_HISTORY,
        DEFAULT_TTL_S,
        tuple(channels),
        s.rate_per_s,
        s.payload_bytes,
        s.duration_s,
        s.coalesce_ms,
    )


def connections_outcome(run: Run, out: Outcome, streams: StreamTotals) -> dict[str, Any]:
    c = connection_figures(run.settings.connections, run.totals, streams.dropped)
    out.sections["connections"] = c
    out.rows += connection_rows(c)
    if c["failed"]:
        out.problems.append(f"{c['failed']} connections failed")
    return c


def delivery_outcome(
    run: Run,
    out: Outcome,
    published: Mapping[str, Any],
    streams: StreamTotals,
    flow: DeliveryRun,
    window_end: ProcSample | None,
    metrics_after: dict[str, float] | None,
) -> None:
    """The figures of a publish-and-deliver run: what was published, exact delivery, latency, the hub's cost per
    delivery over the window, and the problems found."""
    s = run.settings
    connections_outcome(run, out, streams)
    total_published = sum(published["published"].values())
    elapsed_s = published["elapsed_s"]
    delivery = {
        "channels": s.channels,
        "published": total_published,
        "publish_requests": run.totals.requests,
        "publish_errors": run.totals.publish_errors,
        "publish_elapsed_s": round(elapsed_s, 3),
        "publish_behind_ms": round(published["behind_s"] * 1000, 3),
        "subscribers": streams.subscribers,
        "complete_subscribers": streams.complete,
        "expected": streams.expected,
        "delivered": streams.delivered,
        "missing": streams.missing,
        "gaps": streams.gaps,
        "duplicates": streams.duplicates,
        "out_of_order": streams.out_of_order,
        "beyond": streams.beyond,
        "unexpected": streams.unexpected,
        "resets": streams.resets,
        "delivered_per_s": round(streams.delivered / elapsed_s, 1) if elapsed_s > 0 else None,
    }
    latency = latency_ms(run.totals.latency_us)
    request = latency_ms(run.totals.request_us)
    hub = hub_figures(
        s.pids,
        flow.window_start,
        window_end,
        run.proc.peak_rss_bytes,
        count=streams.delivered,
        per="delivery",
        metrics_before=flow.metrics_before,
        metrics_after=metrics_after,
    )
    if flow.before is not None:
        hub["rss_unconnected_bytes"] = flow.before.rss_bytes
    out.sections |= {"delivery": delivery, "latency_ms": latency, "publish_request_ms": request, "hub": hub}
    out.rows += [
        (
            "published",
            f"{total_published} events in {elapsed_s:.1f} s over {s.channels} channels "
            f"({run.totals.requests} requests, {run.totals.publish_errors} errors)",
        ),
        ("deliveries / expected", f"{streams.delivered} / {streams.expected} ({delivery['delivered_per_s']}/s)"),
        (
            "missing / gaps / duplicates / out of order",
            f"{streams.missing} / {streams.gaps} / {streams.duplicates} / {streams.out_of_order}",
        ),
        ("publish-to-receipt latency p50 / p90 / p99 / max", fmt_latency(latency)),
        ("publish request p50 / p90 / p99 / max", fmt_latency(request)),
        *hub_rows(hub, "delivery"),
    ]
    if run.totals.publish_errors:
        out.problems.append(f"{run.totals.publish_errors} publish requests failed")
    out.problems += streams.problems()
    out.problems += run.proc.errors + run.metrics.errors


@dataclass(slots=True)
class DeliveryRun:
    """A publish-and-deliver run under way: its subscribers, its one publishing worker, and the start of the
    measured window (taken when every stream is live, just before the first publish)."""

    subs: list[WorkerHandle]
    pub: list[WorkerHandle]
    before: ProcSample | None  # the hub before any connection
    window_start: ProcSample | None
    metrics_before: dict[str, float] | None


def http_publisher(run: Run, channels: list[str], events: int | None) -> tuple[str, object]:
    s = run.settings
    job = FanoutPublishJob(
        s.target, s.urls, tuple(channels), s.rate_per_s, s.batch, s.payload_bytes, s.duration_s, events, s.token
    )
    return "fanout-publisher", job


async def start_delivery(run: Run, channels: list[str], publisher: tuple[str, object], phase: str) -> DeliveryRun:
    """Spawn the subscribers and the publisher together (the publisher starts up while the subscribers connect),
    wait until every stream is live, so each subscriber sees its channel from sequence 0, and start publishing."""
    before = run.sample()
    run.begin_phase("connect")
    subs = spawn_subscribers(run, channels)
    role, job = publisher
    pub = run.spawn(role, [job])
    await run.expect(subs, "ready", ramp_timeout_s(run))
    await run.expect(pub, "ready", _SPAWN_S)
    metrics_before = await run.scrape()
    window_start = run.sample()
    run.begin_phase(phase)
    run.send(pub, "start")
    return DeliveryRun(subs, pub, before, window_start, metrics_before)


async def finish_delivery(run: Run, out: Outcome, d: DeliveryRun, publish_s: float) -> StreamTotals:
    """Wait for the publisher, drain the subscribers, and add the delivery figures to `out`."""
    (published,) = await run.expect(d.pub, "done", publish_s * 2 + _SPAWN_S)
    run.begin_phase("drain")
    streams, window_end, metrics_after = await finish_subscribers(
        run, d.subs, published["published"], run.settings.drain_timeout_s
    )
    delivery_outcome(run, out, published, streams, d, window_end, metrics_after)
    return streams


# -- scenarios ------------------------------------------------------------------------------------------------------


@register
class Idle(Scenario):
    name = "idle"
    summary = "open N connections over M channels and hold them for --duration: hub RSS per idle connection"

    async def run(self, run: Run) -> Outcome:
        s = run.settings
        out = Outcome()
        channels = [run.channel(i) for i in range(s.channels)]
        before = run.sample()
        run.begin_phase("connect")
        subs = spawn_subscribers(run, channels)
        ramp = await run.expect(subs, "ready", ramp_timeout_s(run))
        run.begin_phase("hold")
        loaded = run.sample()
        await run.hold(s.duration_s)
        after = run.sample()
        streams, _, _ = await finish_subscribers(run, subs, dict.fromkeys(channels, 0), 0.0)
        c = connections_outcome(run, out, streams)
        span_s = max(r["ended"] for r in ramp) - min(r["began"] for r in ramp)
        c["opened_per_s"] = round(c["opened"] / span_s, 1) if span_s > 0 else None
        out.rows.append(("connections opened per second (first attempt to last live)", f"{c['opened_per_s']}"))
        hub = hub_figures(s.pids, before, after, run.proc.peak_rss_bytes)
        if before is not None and after is not None and loaded is not None and c["opened"]:
            hub["rss_loaded_bytes"] = loaded.rss_bytes
            hub["rss_per_connection_bytes"] = round((after.rss_bytes - before.rss_bytes) / c["opened"], 1)
            hold_cpu_s = after.cpu_s - loaded.cpu_s
            hub["hold_cpu_percent"] = round(hold_cpu_s / max(after.at_s - loaded.at_s, 1e-9) * 100, 2)
            out.rows += [
                (
                    "hub RSS before / after connecting",
                    f"{before.rss_bytes / 2**20:.1f} / {after.rss_bytes / 2**20:.1f} MiB",
                ),
                ("hub RSS per idle connection", f"{hub['rss_per_connection_bytes'] / 1024:.2f} KiB"),
                ("hub CPU while holding", f"{hub['hold_cpu_percent']}%"),
            ]
        out.sections["hub"] = hub
        out.problems += streams.problems()
        out.problems += run.proc.errors
        return out


@register
class Fanout(Scenario):
    name = "fanout"
    summary = "N subscribers over M channels, publish at R events/s: end-to-end latency and exact delivery accounting"

    async def run(self, run: Run) -> Outcome:
        s = run.settings
        out = Outcome()
        channels = [run.channel(i) for i in range(s.channels)]
        d = await start_delivery(run, channels, http_publisher(run, channels, s.events), "publish")
        publish_s = (s.events / s.rate_per_s) if s.events is not None else s.duration_s
        await finish_delivery(run, out, d, publish_s)
        return out


@register
class Generations(Scenario):
    name = "generations"
    summary = (
        "AI pace: one generation per channel, one subscriber each, tokens appended to the hub's Redis the way "
        "producer workers do (coalesced, fenced): latency and exact delivery"
    )
    defaults: ClassVar[Mapping[str, Any]] = {"connections": 1000, "channels": 1000, "rate_per_s": 20_000.0}

    def check(self, settings: LoadSettings) -> None:
        if settings.redis_url is None:
            raise ValueError("generations appends to the hub's Redis as producers do: give --redis-url")
        if settings.target != "hub":
            raise ValueError("generations writes our hub's stream format into Redis: it runs with --target hub only")

    async def run(self, run: Run) -> Outcome:
        s = run.settings
        assert s.redis_url is not None
        out = Outcome()
        channels = [run.channel(i) for i in range(s.channels)]
        d = await start_delivery(run, channels, ("generations", generations_job(run, channels)), "generate")
        await finish_delivery(run, out, d, s.duration_s)
        out.rows.insert(0, ("tokens per generation per second", f"{s.rate_per_s / s.channels:g}"))
        return out


@register
class ReconnectStorm(Scenario):
    name = "reconnect-storm"
    summary = (
        "drop every connection at once while events flow and reconnect all with Last-Event-ID: time until all "
        "caught up, exact delivery, and the store commands the storm cost (with --redis-url, which also makes the "
        "events tokens appended as producers do)"
    )
    defaults: ClassVar[Mapping[str, Any]] = {
        "connections": 5000,
        "channels": 500,
        "rate_per_s": 1000.0,
        "duration_s": 20.0,
    }

    def check(self, settings: LoadSettings) -> None:
        if settings.events is not None:
            raise ValueError("reconnect-storm publishes for --duration (the storm comes a quarter of the way in)")

    async def run(self, run: Run) -> Outcome:
        s = run.settings
        out = Outcome()
        channels = [run.channel(i) for i in range(s.channels)]
        # With --redis-url, tokens appended as producers append them: the storm is measured on the hub's subscribe
        # path, not on thousands of HTTP publish requests competing with it.
        publisher = (
            ("generations", generations_job(run, channels))
            if s.redis_url is not None and s.target == "hub"
            else http_publisher(run, channels, None)
        )
        flow = await start_delivery(run, channels, publisher, "publish")
        subs = flow.subs
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await run.hold(max(0.0, t0 + s.duration_s / 4 - loop.time()))
        storm_start, storm_commands = loop.time(), await run.redis.commands()
        metrics_storm = await run.scrape()
        run.begin_phase("storm")
        run.send(subs, "storm", {"timeout_s": s.connect_timeout_s})
        await run.expect(subs, "answered", s.connect_timeout_s + _SPAWN_S)
        storm_end, end_commands = loop.time(), await run.redis.commands()
        metrics_caught_up = await run.scrape()
        stormed = await run.expect(subs, "stormed", s.connect_timeout_s + _SPAWN_S)
        run.begin_phase("publish")
        streams = await finish_delivery(run, out, flow, s.duration_s)
        delivery_rows, out.rows = out.rows, []

        catch_up, reconnect = Histogram(), Histogram()
        failed = not_caught_up = 0
        for part in stormed:
            catch_up.merge(part["catch_up_us"])
            reconnect.merge(part["reconnect_us"])
            failed += part["reconnect_failed"]
            not_caught_up += part["not_caught_up"]
        storm: dict[str, Any] = {
            "reconnected": reconnect.count,
            "reconnect_failed": failed,
            "caught_up": catch_up.count,
            "not_caught_up": not_caught_up,
            "reconnect_ms": latency_ms(reconnect),
            "catch_up_ms": latency_ms(catch_up),
            "storm_s": round(storm_end - storm_start, 3),
        }
        if storm_commands is not None and end_commands is not None:
            by_command = {
                k: n - storm_commands.get(k, 0) for k, n in end_commands.items() if n > storm_commands.get(k, 0)
            }
            # Each history read of the hub is one script (EVALSHA) that runs XINFO STREAM once on a stream that exists;
            # nothing else calls it (appends run EXISTS too). So XINFO counts the storm's store round trips exactly.
            storm |= {"store_commands_by_command": by_command, "store_history_reads": by_command.get("xinfo", 0)}
        if metrics_storm is not None and metrics_caught_up is not None:
            d = metrics_delta(metrics_storm, metrics_caught_up)
            storm["resumes_from_window"] = d.get('hub_resumes_total{source="window"}', 0.0)
            storm["resumes_from_store"] = d.get('hub_resumes_total{source="store"}', 0.0)
            storm["hub_store_reads"] = d.get("hub_subscribe_store_reads_total", 0.0)
        out.sections["storm"] = storm
        out.rows += [
            (
                "storm: reconnected / failed / caught up",
                f"{reconnect.count} / {failed} / {catch_up.count} of {streams.subscribers or s.connections}",
            ),
            ("storm: reconnect answered p50 / p90 / p99 / max", fmt_latency(storm["reconnect_ms"])),
            ("storm: caught up p50 / p90 / p99 / max", fmt_latency(storm["catch_up_ms"])),
        ]
        if "store_history_reads" in storm:
            out.rows.append(
                (
                    "storm: history reads in Redis until every reconnect was answered",
                    f"{storm['store_history_reads']} for {s.channels} channels and {reconnect.count} reconnects "
                    f"({storm['storm_s']:.2f} s)",
                )
            )
        if "resumes_from_window" in storm:
            out.rows.append(
                (
                    "storm: resumes served from the node's window / from the store; store reads the hub made",
                    f"{storm['resumes_from_window']:.0f} / {storm['resumes_from_store']:.0f}; "
                    f"{storm['hub_store_reads']:.0f}",
                )
            )
        if failed:
            out.problems.append(f"storm: {failed} reconnects failed")
        if not_caught_up:
            out.problems.append(f"storm: {not_caught_up} streams had not caught up after {s.connect_timeout_s:g} s")
        out.rows += delivery_rows  # the storm's own figures first
        out.problems += run.redis.errors
        return out


@register
class Publish(Scenario):
    name = "publish"
    summary = "HTTP publish throughput with --connections concurrent publishers, no subscribers: batch 1, then --batch"
    defaults: ClassVar[Mapping[str, Any]] = {"connections": 16, "rate_per_s": 0.0}

    async def run(self, run: Run) -> Outcome:
        s = run.settings
        out = Outcome()
        w = s.client_workers
        loops = [run.channel(i % s.channels) for i in range(s.connections)]
        events_share = _split(s.events, w) if s.events is not None else [None] * w
        jobs = [
            PublishLoopsJob(
                s.target,
                s.urls,
                tuple(loops[k::w]),
                s.rate_per_s / w,
                s.payload_bytes,
                s.duration_s,
                events_share[k],
                s.token,
            )
            for k in range(w)
        ]
        workers = run.spawn("publish-loops", jobs)
        await run.expect(workers, "ready", _SPAWN_S)
        phases: list[dict[str, Any]] = []
        for batch in sorted({1, s.batch}):
            run.begin_phase(f"batch {batch}")
            before = run.sample()
            metrics_before = await run.scrape()
            run.send(workers, "start", {"batch": batch})
            phase_s = s.events / max(s.rate_per_s, 1) if s.events is not None else s.duration_s
            done = await run.expect(workers, "done", phase_s * 10 + _SPAWN_S)
            after = run.sample()
            metrics_after = await run.scrape()
            t = run.phase_totals
            elapsed_s = max(d["elapsed_s"] for d in done)
            request = latency_ms(t.request_us)
            hub = hub_figures(
                s.pids,
                before,
                after,
                run.proc.peak_rss_bytes,
                count=t.published,
                per="event",
                metrics_before=metrics_before,
                metrics_after=metrics_after,
            )
            phases.append(
                {
                    "batch": batch,
                    "requests": t.requests,
                    "events": t.published,
                    "errors": t.publish_errors,
                    "elapsed_s": round(elapsed_s, 3),
                    "events_per_s": round(t.published / elapsed_s, 1),
                    "requests_per_s": round(t.requests / elapsed_s, 1),
                    "request_ms": request,
                    "hub": hub,
                }
            )
            out.rows += [
                (
                    f"batch {batch}: events/s (requests/s)",
                    f"{t.published / elapsed_s:,.0f} ({t.requests / elapsed_s:,.0f}); {t.publish_errors} errors",
                ),
                (f"batch {batch}: request p50 / p90 / p99 / max", fmt_latency(request)),
                *((f"batch {batch}: {label}", value) for label, value in hub_rows(hub, "event")),
            ]
            if t.publish_errors:
                out.problems.append(f"batch {batch}: {t.publish_errors} publish requests failed")
        out.sections["publishers"] = s.connections
        out.sections["errors"] = dict(sorted(run.totals.errors.items()))
        out.sections["phases"] = phases
        out.problems += run.proc.errors + run.metrics.errors
        return out


def _split(total: int, parts: int) -> list[int | None]:
    """`total` dealt into `parts` shares that differ by at most one."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]
