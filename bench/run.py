"""`make bench`: our hub beside Nchan, measured in the same run by the load tester.

Starts, on free loopback ports, its own redis-server, one hub node on it, and nginx + Nchan (bench/nchan.conf.template:
memory store, one worker). Runs every entry of `standard_runs()` against each of them with `python -m loadtest ...
--json` (server CPU and RSS sampled from /proc: the hub process, the nginx worker), and writes Markdown: per run our
figure, Nchan's and the ratio, then every figure of the JSON. Whatever it started is stopped by PID at the end, on error
and on Ctrl-C; each step has a deadline, so a run always ends by itself.

    python bench/run.py [--quick] [--only NAME[,NAME...]] [--out FILE]

A new scenario is one more `BenchRun` in `standard_runs()`; a target it does not support shows "n/a".
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as `python bench/run.py`

from bench.nchan import NchanServer, missing  # noqa: E402
from tests.processes import RedisServer, Service, free_port  # noqa: E402

__all__ = ["BenchRun", "Figure", "Target", "main", "standard_runs"]

DEFAULT_OUT = ROOT / "bench" / "results.md"
# Saturation: the highest publish rate that keeps p99 at or under this, with nothing lost.
SATURATION_P99_MS = 100.0
# ... and at which the publisher really got its events out at (nearly) that rate: the load tester takes the send time
# after its own per-channel queue, so a server that answers publishes too slowly shows as a lower rate, not latency.
SATURATION_MIN_RATE_SHARE = 0.95
# A rate passes when most of its tries pass: 2 of at most 3. One short try on two shared cores can land on either side
# of the bound by chance (seen: the same server at the same rate, 64 ms in one try and 123 ms in the next).
SATURATION_TRIES = 3
# Allowance for spawning load-test workers, connecting, draining and closing, on top of a run's own duration.
_RUN_SLACK_S = 120.0
_SETTLE_S = 1.0  # between runs: let the last run's sockets close and the servers go quiet
# The hub's own limits would otherwise throttle one load-test client (they are per publisher and per IP).
HUB_LOAD_FLAGS = (
    "--anonymous",
    "--publish-rate",
    "1000000",
    "--publish-burst",
    "1000000",
    "--publish-bytes-rate",
    "1000000000",
    "--publish-bytes-burst",
    "1000000000",
    "--max-streams-per-client",
    "1000000",
    "--max-streams",
    "1000000",
)


# -- what is run and what is tabulated -------------------------------------------------------------------------------

Value = float | int | str | None


@dataclass(frozen=True, slots=True)
class Figure:
    """One row of a comparison table: a label, how to read the value from a loadtest JSON result, how to show it,
    and which way is better (None: a figure that is not compared, such as a count that must be 0)."""

    label: str
    value: Callable[[dict[str, Any]], Value]
    unit: str = ""  # ms, us, KiB, MiB, /s, %, or "" (as it is)
    better: str | None = "lower"  # lower | higher | None


def at(*path: str | int) -> Callable[[dict[str, Any]], Value]:
    """A getter for the value at `path` in a JSON result (None where the path does not exist)."""

    def get(result: dict[str, Any]) -> Value:
        node: Any = result
        for key in path:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return None
        return node if isinstance(node, int | float | str) else None

    return get


def kib(*path: str | int) -> Callable[[dict[str, Any]], Value]:
    get = at(*path)

    def to_kib(result: dict[str, Any]) -> Value:
        v = get(result)
        return v / 1024 if isinstance(v, int | float) else None

    return to_kib


def mib(*path: str | int) -> Callable[[dict[str, Any]], Value]:
    get = kib(*path)

    def to_mib(result: dict[str, Any]) -> Value:
        v = get(result)
        return v / 1024 if isinstance(v, int | float) else None

    return to_mib


def _delivery_counts(result: dict[str, Any]) -> Value:
    d = result.get("delivery")
    if not isinstance(d, dict):
        return None
    return " / ".join(f"{d.get(k, '?')}" for k in ("missing", "gaps", "duplicates", "out_of_order"))


def _delivered_of_expected(result: dict[str, Any]) -> Value:
    d = result.get("delivery")
    if not isinstance(d, dict):
        return None
    return f"{d.get('delivered', 0):,} / {d.get('expected', 0):,}"


def _hub_lag_ms(result: dict[str, Any]) -> Value:
    """The hub's own share of the latency: its mean delivery lag (append → written to the subscribers' sockets) over
    the window, from the scraped `hub_delivery_lag_seconds`; None for a server without that metric."""
    metrics = result.get("hub", {}).get("metrics")
    if not isinstance(metrics, dict) or not metrics.get("hub_delivery_lag_seconds_count"):
        return None
    lag_s = float(metrics["hub_delivery_lag_seconds_sum"]) / float(metrics["hub_delivery_lag_seconds_count"])
    return round(lag_s * 1000, 2)


def _publish_errors(result: dict[str, Any]) -> Value:
    phases = result.get("phases")
    if not isinstance(phases, list):
        return None
    return sum(int(p.get("errors", 0)) for p in phases)


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchRun:
    """One comparison: a loadtest scenario with its flags, run once against each target (or, with `search_rates`,
    once per rate, ascending, until a rate fails the saturation test)."""

    name: str  # the table's name, and what --only selects
    scenario: str  # a loadtest scenario name
    args: tuple[str, ...]  # loadtest flags, besides those naming the target (--url, --target, --pid, --metrics-url)
    figures: tuple[Figure, ...]
    summary: str  # one line under the table's heading
    targets: tuple[str, ...] = ("hub", "nchan")  # the targets able to run it; the others are "n/a"
    # Flags for one target only; `{redis_url}` stands for that target's Redis (the hub's), as a scenario that
    # submits generations needs: target_args={"hub": ("--redis-url", "{redis_url}")}.
    target_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    search_rates: tuple[float, ...] = ()
    duration_s: float = 10.0  # what the run takes by itself (connecting, publishing), for its deadline
    # Rounds, each on every target in turn; the table shows each figure's median. On a shared machine one round can
    # be off by a factor of two, and alternating the targets spreads that over both.
    rounds: int = 1

    @property
    def step_timeout_s(self) -> float:
        """The deadline of one `python -m loadtest` of this run."""
        return self.duration_s + _RUN_SLACK_S


_LATENCY = (
    Figure("publish-to-receipt latency p50", at("latency_ms", "p50_ms"), "ms"),
    Figure("publish-to-receipt latency p99", at("latency_ms", "p99_ms"), "ms"),
    Figure("publish-to-receipt latency max", at("latency_ms", "max_ms"), "ms"),
)
_FANOUT = (
    *_LATENCY,
    # End-to-end latency on two shared cores is mostly the load clients waiting for CPU; this is the server's part.
    Figure("server-side delivery lag mean (hub metric: append → sockets)", _hub_lag_ms, "ms", better=None),
    # Its p99 as the upper bound of the histogram bucket holding it (buckets at 1, 2.5, 5, 10, 25, 50 ms...).
    Figure("server-side delivery lag p99, at most (hub histogram)", at("hub", "lag_p99_bound_ms"), "ms", better=None),
    Figure("server CPU per delivery (publish handling included)", at("hub", "cpu_us_per_delivery"), "us"),
    Figure("server CPU (user + system) over the window", at("hub", "cpu_percent"), "%"),
    Figure("server RSS peak", mib("hub", "rss_peak_bytes"), "MiB"),
    Figure("deliveries / expected", _delivered_of_expected, better=None),
    Figure("missing / gaps / duplicates / out of order", _delivery_counts, better=None),
)


def _fanout_args(connections: int, channels: int, duration_s: float, rate: float | None) -> tuple[str, ...]:
    args = ("--connections", str(connections), "--channels", str(channels), "--duration", f"{duration_s:g}")
    return (*args, "--rate", f"{rate:g}") if rate is not None else args


def standard_runs(quick: bool) -> list[BenchRun]:
    """The comparison, sized to take a few minutes on a 2-core machine (`quick`: a smoke run of a minute or so)."""
    idle_n = 500 if quick else 5000
    subs = 100 if quick else 1000
    fanout_s = 3.0 if quick else 10.0
    search_s = 2.0 if quick else 5.0
    rates = (200.0, 600.0, 1000.0) if quick else (200.0, 400.0, 600.0, 800.0, 1000.0, 1200.0)
    publish_s = 2.0 if quick else 5.0
    gen_n = 100 if quick else 1000
    storm_n = 500 if quick else 5000
    storm_s = 8.0 if quick else 20.0
    runs = [
        BenchRun(
            name="idle",
            scenario="idle",
            args=("--connections", str(idle_n), "--channels", "100", "--duration", "5"),
            summary=f"{idle_n:,} idle EventSource connections over 100 channels, held 5 s: memory per connection",
            duration_s=idle_n / 1000 + 5,
            figures=(
                Figure("server RSS per idle connection", kib("hub", "rss_per_connection_bytes"), "KiB"),
                Figure("server RSS before connecting", mib("hub", "rss_before_bytes"), "MiB"),
                Figure("server RSS with every connection open", mib("hub", "rss_after_bytes"), "MiB"),
                Figure("server CPU while holding them", at("hub", "hold_cpu_percent"), "%"),
                Figure("connect time p99", at("connections", "connect_ms", "p99_ms"), "ms"),
                Figure("connections opened", at("connections", "opened"), better=None),
            ),
        ),
        *(
            BenchRun(
                name=f"fanout-{rate:g}",
                scenario="fanout",
                args=_fanout_args(subs, 10, fanout_s, rate),
                summary=f"{subs:,} subscribers over 10 channels, {rate:g} events/s for {fanout_s:g} s "
                f"({subs // 10 * rate * fanout_s:,.0f} deliveries expected)",
                duration_s=fanout_s + subs / 1000,
                figures=_FANOUT,
                rounds=1 if quick else 3,
            )
            for rate in (200.0, 600.0)
        ),
        BenchRun(
            name="saturation",
            scenario="fanout",
            args=_fanout_args(subs, 10, search_s, None),  # --rate R is added per step
            summary=f"fan-out of {subs:,} subscribers over 10 channels, {search_s:g} s per step: the highest rate of "
            f"{', '.join(f'{r:g}' for r in rates)} events/s with p99 ≤ {SATURATION_P99_MS:g} ms, nothing lost, and "
            f"the rate really published (≥ {SATURATION_MIN_RATE_SHARE:.0%}); a rate passes when "
            f"{SATURATION_TRIES // 2 + 1} of at most {SATURATION_TRIES} tries do, the servers taking turns",
            search_rates=rates,
            duration_s=search_s + subs / 1000,
            figures=(),
        ),
        BenchRun(
            name="generations",
            scenario="generations",
            args=(
                "--connections",
                str(gen_n),
                "--channels",
                str(gen_n),
                "--rate",
                f"{gen_n * 20}",
                "--duration",
                f"{fanout_s:g}",
            ),
            summary=f"AI pace: {gen_n:,} generations, one subscriber each, 20 tokens/s each, appended to the hub's "
            "Redis through the producer's coalescer (Nchan has no such writer: n/a)",
            targets=("hub",),
            target_args={"hub": ("--redis-url", "{redis_url}")},
            duration_s=fanout_s + gen_n / 1000,
            figures=_FANOUT,
        ),
        BenchRun(
            name="reconnect-storm",
            scenario="reconnect-storm",
            args=(
                "--connections",
                str(storm_n),
                "--channels",
                str(storm_n // 10),
                "--rate",
                f"{storm_n // 10 * 2}",
                "--duration",
                f"{storm_s:g}",
            ),
            summary=f"{storm_n:,} subscribers on {storm_n // 10:,} channels, 2 tokens/s per channel appended as "
            "producers do, all dropped a quarter of the way in and reconnected at once with Last-Event-ID (Nchan: "
            "n/a, the tokens go to the hub's Redis)",
            targets=("hub",),
            target_args={"hub": ("--redis-url", "{redis_url}")},
            duration_s=storm_s + storm_n / 1000 + 30,
            figures=(
                Figure("reconnects answered", at("storm", "reconnected"), better=None),
                Figure("reconnect answered p50", at("storm", "reconnect_ms", "p50_ms"), "ms"),
                Figure("reconnect answered max", at("storm", "reconnect_ms", "max_ms"), "ms"),
                Figure("caught up (next live token received) p99", at("storm", "catch_up_ms", "p99_ms"), "ms"),
                Figure("caught up max", at("storm", "catch_up_ms", "max_ms"), "ms"),
                Figure("history reads Redis ran for the storm", at("storm", "store_history_reads"), better="lower"),
                Figure("resumes served from the node's window", at("storm", "resumes_from_window"), better=None),
                Figure("resumes served from the store", at("storm", "resumes_from_store"), better="lower"),
                Figure("missing / gaps / duplicates / out of order", _delivery_counts, better=None),
            ),
        ),
        BenchRun(
            name="publish",
            scenario="publish",
            args=("--connections", "16", "--batch", "100", "--duration", f"{publish_s:g}"),
            summary=f"16 concurrent publishers, no subscribers, {publish_s:g} s at batch 1 then at batch 100 "
            "(Nchan takes one message per request: its batch of 100 is 100 requests in order)",
            duration_s=2 * publish_s,
            figures=(
                Figure("batch 1: events/s", at("phases", 0, "events_per_s"), "/s", "higher"),
                Figure("batch 1: request p99", at("phases", 0, "request_ms", "p99_ms"), "ms"),
                Figure("batch 1: server CPU per event", at("phases", 0, "hub", "cpu_us_per_event"), "us"),
                Figure("batch 1: server CPU (user + system)", at("phases", 0, "hub", "cpu_percent"), "%", None),
                Figure("batch 100: events/s", at("phases", 1, "events_per_s"), "/s", "higher"),
                Figure("batch 100: request p99", at("phases", 1, "request_ms", "p99_ms"), "ms"),
                Figure("batch 100: server CPU per event", at("phases", 1, "hub", "cpu_us_per_event"), "us"),
                Figure("batch 100: server CPU (user + system)", at("phases", 1, "hub", "cpu_percent"), "%", None),
                Figure("publish errors", _publish_errors, better=None),
            ),
        ),
    ]
    return runs


# -- the servers -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    """A server under test, as the load tester reaches and measures it."""

    name: str  # the loadtest adapter: hub | nchan
    label: str  # column heading
    url: str = ""
    pid: int | None = None  # the process whose CPU and RSS are sampled
    metrics_url: str | None = None
    unavailable: str | None = None  # why it is not running
    command: str = ""  # how it was started, for the report
    redis_url: str = ""  # the Redis it runs on, if any

    def loadtest_flags(self, run: BenchRun) -> list[str]:
        own = [a.replace("{redis_url}", self.redis_url) for a in run.target_args.get(self.name, ())]
        flags = [*own, "--target", self.name, "--url", self.url]
        if self.pid is not None:
            flags += ["--pid", str(self.pid)]
        if self.metrics_url is not None:
            flags += ["--metrics-url", self.metrics_url]
        return flags


def _wait_ready(service: Service, url: str, timeout_s: float) -> None:
    """Until `url` answers 200 (the hub's /readyz: listening, and its Redis reachable)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not service.running():
            raise RuntimeError(f"{service.name} exited before it was ready:\n{service.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{service.name} not ready at {url} within {timeout_s:g} s:\n{service.log_tail()}")


def start_hub(stack: ExitStack, workdir: Path) -> Target:
    """Our own redis-server (never on 6379), and one hub node on it."""
    redis = RedisServer(directory=workdir / "redis", own_session=True)
    stack.callback(redis.stop)
    redis.start()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    hub_args = ["--host", "127.0.0.1", "--port", str(port), "--redis-url", redis.url]
    hub_args += [*HUB_LOAD_FLAGS, "--log-level", "warning"]
    hub = Service("hub", [sys.executable, "-m", "hub", *hub_args], workdir / "hub.log", cwd=ROOT, own_session=True)
    # SIGTERM drains: streams end within --grace (10 s); stop() waits a little longer before SIGKILL.
    stack.callback(hub.stop, signal.SIGTERM, 20.0)
    hub.start()
    _wait_ready(hub, f"{url}/readyz", 30)
    return Target(
        "hub",
        "ours (hub)",
        url=url,
        pid=hub.pid,
        metrics_url=f"{url}/metrics",
        redis_url=redis.url,
        command="python -m hub " + " ".join(hub_args).replace(str(redis.port), "<port>").replace(str(port), "<port>"),
    )


def start_nchan(stack: ExitStack) -> tuple[Target, NchanServer | None]:
    why = missing()
    if why is not None:
        return Target("nchan", "Nchan", unavailable=why), None
    server = NchanServer(free_port())
    stack.callback(server.close)
    try:
        server.start()
    except RuntimeError as e:
        return Target("nchan", "Nchan", unavailable=str(e)), None
    return (
        Target(
            "nchan",
            "Nchan",
            url=server.url,
            pid=server.worker_pid,
            command="nginx -p <dir> -e <dir>/error.log -c <dir>/nginx.conf (bench/nchan.conf.template)",
        ),
        server,
    )


# -- running the load tester -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Measurement:
    """What one `python -m loadtest` gave: ok, problems (it ran; the JSON says what went wrong), n/a, failed."""

    status: str
    result: dict[str, Any] | None = None
    note: str = ""
    rate: float | None = None  # the step's rate, in a saturation search
    passed: bool | None = None  # the step's verdict, in a saturation search
    tries: tuple[bool, ...] = ()  # each try's verdict, in order; the result shown is the try with the median p99


@dataclass(slots=True)
class Measured:
    run: BenchRun
    by_target: dict[str, list[Measurement]] = field(default_factory=dict)


def _known_scenarios() -> set[str]:
    from loadtest.scenario import SCENARIOS

    return set(SCENARIOS)


def run_loadtest(run: BenchRun, target: Target, extra: Sequence[str], workdir: Path, tag: str) -> Measurement:
    """One `python -m loadtest` against `target`, within the run's deadline; its JSON read back."""
    if target.unavailable is not None:
        return Measurement("n/a", note=target.unavailable)
    if target.name not in run.targets:
        return Measurement("n/a", note=f"{target.label} has no {run.scenario!r} scenario")
    if run.scenario not in _known_scenarios():
        return Measurement("n/a", note=f"the load tester has no {run.scenario!r} scenario yet")
    json_path = workdir / f"{tag}.json"
    argv = [sys.executable, "-m", "loadtest", run.scenario, *run.args, *extra, *target.loadtest_flags(run)]
    lt = Service(
        f"loadtest {tag}", [*argv, "--json", str(json_path)], workdir / f"{tag}.log", cwd=ROOT, own_session=True
    )
    lt.start()
    assert lt.proc is not None
    try:
        code = lt.proc.wait(run.step_timeout_s)
    except subprocess.TimeoutExpired:
        return Measurement("failed", note=f"no result within {run.step_timeout_s:g} s:\n{lt.log_tail()}")
    finally:
        # Normally it has exited already; otherwise (deadline, Ctrl-C) SIGINT lets it stop its workers first.
        lt.stop(signal.SIGINT, 30.0)
    result: dict[str, Any] | None = orjson.loads(json_path.read_bytes()) if json_path.exists() else None
    if code == 0 and result is not None:
        return Measurement("ok", result)
    if code == 1 and result is not None:
        return Measurement("problems", result, note="; ".join(result.get("problems", [])))
    if code == 2:
        # Settings the load tester refused (say, a scenario that this target cannot serve): not applicable.
        return Measurement("n/a", note=lt.log_tail(3))
    return Measurement("failed", note=f"exit status {code}:\n{lt.log_tail()}")


def saturation_verdict(result: dict[str, Any] | None, rate: float) -> tuple[bool, str]:
    """Whether a fan-out step at `rate` passed: p99 within bound, nothing lost or failed, the rate really published."""
    if result is None:
        return False, "no result"
    d, c, lat = result.get("delivery", {}), result.get("connections", {}), result.get("latency_ms", {})
    lost = sum(int(d.get(k, 0)) for k in ("missing", "gaps", "duplicates", "out_of_order"))
    p99 = lat.get("p99_ms")
    elapsed = float(d.get("publish_elapsed_s") or 0)
    published_rate = d.get("published", 0) / elapsed if elapsed > 0 else 0.0
    why = []
    if p99 is None or p99 > SATURATION_P99_MS:
        why.append(f"p99 {p99} ms")
    if lost or c.get("failed") or c.get("dropped") or d.get("publish_errors"):
        why.append("lost or failed")
    if published_rate < SATURATION_MIN_RATE_SHARE * rate:
        why.append(f"published {published_rate:,.0f}/s")
    return not why, ", ".join(why)


def measure(runs: Sequence[BenchRun], targets: Sequence[Target], workdir: Path) -> list[Measured]:
    out: list[Measured] = []
    for i, run in enumerate(runs, 1):
        m = Measured(run)
        if run.search_rates:
            print(f"[{i}/{len(runs)}] {run.name} on {' and '.join(t.label for t in targets)} in turn ...", flush=True)
            m.by_target = _search(run, targets, workdir)
        else:
            for round_ in range(1, run.rounds + 1):
                for target in targets:
                    of = f", round {round_}/{run.rounds}" if run.rounds > 1 else ""
                    print(f"[{i}/{len(runs)}] {run.name} on {target.label}{of} ...", flush=True)
                    tag = f"{run.name}-{target.name}" + (f"-{round_}" if run.rounds > 1 else "")
                    got = run_loadtest(run, target, (), workdir, tag)
                    m.by_target.setdefault(target.name, []).append(got)
                    print(f"    {got.status}{': ' + got.note.splitlines()[0] if got.note else ''}", flush=True)
                    time.sleep(_SETTLE_S)
        out.append(m)
    return out


def _search(run: BenchRun, targets: Sequence[Target], workdir: Path) -> dict[str, list[Measurement]]:
    """Ascending rates, each target in turn at each rate, until a rate fails for it (a higher one would only take
    longer to fail too). At each rate a target gets up to `SATURATION_TRIES` tries, alternating with the other's,
    until most of them have passed or most have failed."""
    steps: dict[str, list[Measurement]] = {t.name: [] for t in targets}
    searching = list(targets)
    need = SATURATION_TRIES // 2 + 1
    for rate in run.search_rates:
        tries: dict[str, list[Measurement]] = {t.name: [] for t in searching}
        undecided = list(searching)
        while undecided:
            for target in list(undecided):
                n = len(tries[target.name]) + 1
                got = _try(run, target, rate, n, workdir)
                if got.status == "n/a":
                    steps[target.name] = [got]
                    undecided.remove(target)
                    searching.remove(target)
                    continue
                tries[target.name].append(got)
                passes = sum(1 for t in tries[target.name] if t.passed)
                if passes >= need or n - passes >= need:
                    step = _median_try(tries[target.name])
                    step.passed = passes >= need
                    steps[target.name].append(step)
                    undecided.remove(target)
                    if not step.passed:
                        searching.remove(target)
                time.sleep(_SETTLE_S)
        if not searching:
            break
    return steps


def _try(run: BenchRun, target: Target, rate: float, n: int, workdir: Path) -> Measurement:
    """Try `n` of one saturation step: the load test at `rate`, with its verdict (`passed`) unless not applicable."""
    got = run_loadtest(run, target, ("--rate", f"{rate:g}"), workdir, f"{run.name}-{rate:g}-{target.name}-{n}")
    got.rate = rate
    if got.status == "n/a":
        print(f"    {target.label}: n/a: {got.note.splitlines()[0] if got.note else ''}", flush=True)
        return got
    if got.status in ("ok", "problems"):
        got.passed, why = saturation_verdict(got.result, rate)
    else:
        got.passed, why = False, got.note.splitlines()[0] if got.note else got.status
    print(f"    {target.label} {rate:g}/s, try {n}: {'pass' if got.passed else f'fail ({why})'}", flush=True)
    return got


def _median_try(tries: Sequence[Measurement]) -> Measurement:
    """The try to show for a step (the one with the median p99), carrying every try's verdict."""

    def p99(m: Measurement) -> float:
        value = (m.result or {}).get("latency_ms", {}).get("p99_ms")
        return float(value) if isinstance(value, int | float) else math.inf

    ranked = sorted(tries, key=p99)
    shown = ranked[(len(ranked) - 1) // 2]
    return dataclasses.replace(shown, tries=tuple(bool(t.passed) for t in tries))


# -- the report ------------------------------------------------------------------------------------------------------

_UNITS: dict[str, Callable[[float], str]] = {
    "ms": lambda v: f"{v:.2f} ms",
    "us": lambda v: f"{v:.1f} µs",
    "KiB": lambda v: f"{v:.2f} KiB",
    "MiB": lambda v: f"{v:.1f} MiB",
    "/s": lambda v: f"{v:,.0f}/s",
    "%": lambda v: f"{v:.1f}%",
}
# Parts of a loadtest JSON that are not figures: the settings and command are shown once per run instead.
_NOT_FIGURES = {"settings", "rows", "command", "machine", "run_id", "started_at", "scenario", "ok", "problems"}


def fmt(value: Value, unit: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if unit in _UNITS:
        return _UNITS[unit](float(value))
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def ratio(ours: Value, theirs: Value) -> str:
    if isinstance(ours, int | float) and isinstance(theirs, int | float) and theirs:
        return f"{ours / theirs:.2f}×"
    return "–"


def _cell(m: Measurement, figure: Figure) -> tuple[str, Value]:
    if m.status in ("n/a", "failed") or m.result is None:
        return m.status, None
    value = figure.value(m.result)
    return fmt(value, figure.unit), value


def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every leaf of a JSON result as (dotted key, JSON text), leaving out what is not a figure."""
    if isinstance(node, dict):
        for k, v in node.items():
            if prefix or k not in _NOT_FIGURES:
                yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list) and any(isinstance(x, dict | list) for x in node):
        for i, v in enumerate(node):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, orjson.dumps(node).decode()


def _shown(command: Sequence[str]) -> str:
    """A loadtest command line as run, but for the temporary path of its JSON output."""
    out = list(command)
    if "--json" in out[:-1]:
        out[out.index("--json") + 1] = "<file>"
    return " ".join(out)


def _details(title: str, columns: Sequence[tuple[str, Measurement]]) -> list[str]:
    values = [dict(flatten(m.result)) if m.result is not None else {} for _, m in columns]
    keys: dict[str, None] = {}
    for v in values:
        keys |= dict.fromkeys(v)
    if not keys:
        return []
    lines = [f"<details><summary>{title}</summary>", "", "| figure | " + " | ".join(h for h, _ in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    lines += [f"| `{k}` | " + " | ".join(v.get(k, "–") for v in values) + " |" for k in keys]
    commands = [f"- {h}: `{_shown(m.result['command'])}`" for h, m in columns if m.result is not None]
    return [*lines, "", "Commands:", "", *commands, "", "</details>", ""]


def _notes(targets: Sequence[Target], steps: dict[str, list[Measurement]]) -> list[str]:
    out = []
    for t in targets:
        for m in steps.get(t.name, []):
            if m.status != "ok" and m.note:
                at_rate = f" at {m.rate:g}/s" if m.rate is not None else ""
                out.append(f"- {t.label}{at_rate}: {m.status}: {m.note.splitlines()[0]}")
    return [*out, ""] if out else []


def render_run(m: Measured, targets: Sequence[Target]) -> list[str]:
    run = m.run
    ours, theirs = targets
    cmd = " ".join(["python -m loadtest", run.scenario, *run.args, *(("--rate", "R") if run.search_rates else ())])
    lines = [f"## {run.name}", "", f"{run.summary}. `{cmd}`", ""]
    if run.search_rates:
        lines += _render_search(m, targets)
    else:
        a, b = m.by_target[ours.name], m.by_target[theirs.name]
        lines += [f"| figure | {ours.label} | {theirs.label} | ours / Nchan | better |", "|---|--:|--:|--:|---|"]
        for f in run.figures:
            (ta, va), (tb, vb) = _median_cell(a, f), _median_cell(b, f)
            r = ratio(va, vb) if f.better else ""
            lines.append(f"| {f.label} | {ta} | {tb} | {r} | {f.better or ''} |")
        lines.append("")
        if len(a) > 1 or len(b) > 1:
            lines += [
                f"Each figure is the median of {run.rounds} rounds, run on each server in turn. Round by round:",
                "",
                f"| figure | {ours.label} | {theirs.label} | ours / Nchan |",
                "|---|--:|--:|--:|",
            ]
            for f in run.figures:
                if f.better:
                    pairs = [(_cell(x, f), _cell(y, f)) for x, y in zip(a, b, strict=False)]
                    ta, tb = " / ".join(p[0][0] for p in pairs), " / ".join(p[1][0] for p in pairs)
                    lines.append(f"| {f.label} | {ta} | {tb} | {' / '.join(ratio(p[0][1], p[1][1]) for p in pairs)} |")
            lines.append("")
        lines += _notes(targets, m.by_target)
        title = "Every figure of the JSON results" + (f" (round 1 of {run.rounds})" if run.rounds > 1 else "")
        lines += _details(title, [(ours.label, a[0]), (theirs.label, b[0])])
    return lines


def _median_cell(ms: Sequence[Measurement], figure: Figure) -> tuple[str, Value]:
    """A figure over rounds: the median of its numbers; a text that differs between rounds, each, in order."""
    cells = [_cell(m, figure) for m in ms]
    numbers = [v for _, v in cells if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(cells) > 1 and len(numbers) == len(cells):
        value = statistics.median(numbers)
        return fmt(value, figure.unit), value
    if len(cells) == 1:
        return cells[0]
    texts = [t for t, _ in cells]
    return (texts[0] if len(set(texts)) == 1 else " / ".join(texts)), None


def _step_cell(m: Measurement | None) -> str:
    if m is None:
        return "not run (a lower rate failed)"
    if m.result is None:
        return m.status
    d, lat = m.result.get("delivery", {}), m.result.get("latency_ms", {})
    elapsed = float(d.get("publish_elapsed_s") or 0)
    rate = d.get("published", 0) / elapsed if elapsed else 0.0
    lost = sum(int(d.get(k, 0)) for k in ("missing", "gaps", "duplicates", "out_of_order"))
    verdict = "pass" if m.passed else "fail"
    if len(m.tries) > 1:
        verdict += f", {sum(m.tries)} of {len(m.tries)} tries passed; the median try"
    return f"{verdict}: p99 {fmt(lat.get('p99_ms'), 'ms')}, {rate:,.0f}/s published, {lost} lost"


def highest_passing(steps: Sequence[Measurement]) -> float | None:
    passed = [m.rate for m in steps if m.passed and m.rate is not None]
    return max(passed) if passed else None


def _render_search(m: Measured, targets: Sequence[Target]) -> list[str]:
    run = m.run
    ours, theirs = targets
    by_rate = {t.name: {s.rate: s for s in m.by_target[t.name]} for t in targets}
    lines = [f"| events/s | {ours.label} | {theirs.label} | ours / Nchan |", "|--:|---|---|--:|"]
    for rate in run.search_rates:
        cells = [_step_cell(by_rate[t.name].get(rate)) for t in targets]
        lines.append(f"| {rate:g} | {cells[0]} | {cells[1]} | |")
    best = [highest_passing(m.by_target[t.name]) for t in targets]
    shown = [
        "n/a" if m.by_target[t.name] and m.by_target[t.name][0].status == "n/a" else (f"{b:g}" if b else "none")
        for t, b in zip(targets, best, strict=True)
    ]
    lines += [f"| **highest passing** | **{shown[0]}** | **{shown[1]}** | {ratio(best[0], best[1])} |", ""]
    lines += _notes(targets, m.by_target)
    for rate in run.search_rates:
        cols = [(t.label, by_rate[t.name][rate]) for t in targets if rate in by_rate[t.name]]
        lines += _details(f"Every figure at {rate:g} events/s (each server's median try)", cols)
    return lines


def _version(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _code_version() -> str:
    """The commit measured, and whether the servers' or the load tester's code differed from it."""
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    # The results files are what a bench writes: a previous run's left uncommitted does not change what is measured.
    paths = ["hub", "loadtest", "bench", ":(exclude)bench/results*.md"]
    dirty = _version(["git", "-C", str(ROOT), "status", "--porcelain", "--", *paths])
    return f"commit {commit}" + (" with uncommitted changes in hub/, loadtest/ or bench/" if dirty != "?" else "")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def environment(nchan: NchanServer | None, load_before: str) -> list[str]:
    """Where the figures come from: machine, versions, and how busy the machine was besides (figures taken on a
    machine that runs something else as well are not comparable). Nchan's version is the running module's own."""
    redis = _version(["redis-server", "--version"])
    redis_v = next((w[2:] for w in redis.split() if w.startswith("v=")), redis)
    nginx_v, nchan_v = "not installed", "not installed"
    if nchan is not None:
        nginx_v = _version([nchan.master.argv[0], "-v"]).split("/")[-1]
        try:
            nchan_v = nchan.status().get("nchan version", "?")
        except OSError:
            nchan_v = "?"
        nchan_v += f" (Debian {_version(['dpkg-query', '-W', '-f', '${Version}', 'libnginx-mod-nchan'])})"
    return [
        f"- Machine: {platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} cores "
        f"({_cpu_model()}); load tester, servers and Redis share them.",
        f"- Code: {_code_version()}; Python {platform.python_version()}, Redis {redis_v}, nginx {nginx_v}, "
        f"Nchan {nchan_v}.",
        f"- Load average (1, 5, 15 min) before the bench: {load_before}; after it: {_load()}.",
    ]


def render(
    measured: Sequence[Measured], targets: Sequence[Target], env: Sequence[str], started: float, argv: Sequence[str]
) -> str:
    took_s = time.time() - started
    lines = [
        "# Our hub beside Nchan",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} in {took_s / 60:.1f} min by "
        f"`python bench/run.py{''.join(' ' + a for a in argv)}` (`make bench`).",
        "",
        *env,
        f"- Ours: one hub node on its own redis-server: `{targets[0].command}`. CPU and RSS are the hub process's.",
        "- Nchan: nginx with Debian's libnginx-mod-nchan, memory store, one worker "
        f"(`{targets[1].command}`). CPU and RSS are the worker's (shared memory it touched included).",
        "- Both run through the same load tester (`python -m loadtest`, its own worker processes), one target after "
        "the other; ratios are ours / Nchan, so below 1 is ours lower. In the JSON figures, the section `hub` "
        "holds the measured server's process figures, whichever server it is.",
        "",
    ]
    for t in targets:
        if t.unavailable is not None:
            lines += [f"{t.label} did not run: {t.unavailable}", ""]
    for m in measured:
        lines += render_run(m, targets)
    return "\n".join(lines).rstrip() + "\n"


# -- main ------------------------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM takes the same way out as Ctrl-C: every `finally` runs. SIGINT is set too because a shell starts
    # background jobs with it ignored, and Python then leaves it so.
    raise KeyboardInterrupt


def select(runs: list[BenchRun], only: str | None) -> list[BenchRun]:
    """The runs named in --only (a run's name, or a scenario's: `fanout` selects every fan-out run)."""
    if not only:
        return runs
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = names - {r.name for r in runs} - {r.scenario for r in runs}
    if unknown:
        raise ValueError(f"unknown run {', '.join(sorted(unknown))}; known: {', '.join(r.name for r in runs)}")
    return [r for r in runs if r.name in names or r.scenario in names]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run of the whole harness")
    ap.add_argument("--only", help="comma-separated run names (or scenario names) to run")
    ap.add_argument(
        "--out",
        type=Path,
        help=f"write the Markdown here [a full run: {DEFAULT_OUT.relative_to(ROOT)}; with --quick or --only: nowhere]",
    )
    args = ap.parse_args(argv)
    try:
        runs = select(standard_runs(args.quick), args.only)
    except ValueError as e:
        print(f"bench/run.py: {e}", file=sys.stderr)
        return 2
    out: Path | None = args.out or (None if args.quick or args.only else DEFAULT_OUT)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    started, load_before = time.time(), _load()
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        with ExitStack() as stack:
            targets = [start_hub(stack, workdir)]
            nchan_target, nchan = start_nchan(stack)
            targets.append(nchan_target)
            measured = measure(runs, targets, workdir)
            env = environment(nchan, load_before)
    except KeyboardInterrupt:
        print(f"\nbench/run.py: interrupted; everything it started is stopped (logs in {workdir})", file=sys.stderr)
        return 130
    text = render(measured, targets, env, started, argv)
    print(text)
    if out is not None:
        out.write_text(text)
        print(f"written to {out}", file=sys.stderr)
    failed = [m for r in measured for ms in r.by_target.values() for m in ms if m.status == "failed"]
    if failed or nchan is None:
        print(f"bench/run.py: some runs failed or did not run; logs in {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
