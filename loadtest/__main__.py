"""`python -m loadtest SCENARIO [flags]`: flags and LOADTEST_* environment → LoadSettings → file limit → run → report.

The only module that reads os.environ. Every flag is also a variable `LOADTEST_<FLAG>` (`--metrics-url` →
`LOADTEST_METRICS_URL`; the scenario is `LOADTEST_SCENARIO`); flags win. Lists are comma-separated or repeated flags.

    SCENARIO            idle | fanout | generations | reconnect-storm | publish
    --url URL           hub base URL(s); connections and publishes go round-robin   [http://127.0.0.1:8080]
    --connections N     subscribers (idle, fanout) or concurrent publishers (publish) [1000; publish: 16]
    --channels M        channels the connections spread over                        [10]
    --ramp R            connections opened per second, in total (a large R: as fast as the server accepts) [1000]
    --rate R            events published per second, in total (publish: 0 = as fast as possible) [100; publish: 0]
    --batch B           events per publish request (publish: a second phase at B)   [1]
    --payload BYTES     padding in each event's data                                [0]
    --duration S        seconds to publish (idle: to hold the connections)          [10]
    --events N          publish exactly N events (each phase, for publish) instead of --duration
    --workers W         client processes                                            [CPU count]
    --pid PID           hub process(es) to read RSS and CPU of from /proc
    --metrics-url URL   hub /metrics page(s), scraped around the measured window
    --json FILE         write every figure as JSON
    --markdown FILE     write the table as Markdown (it is also printed)
    --plot FILE         write a PNG of latency and throughput over time (needs matplotlib: the `plot` extra)
    --token TOKEN       sent as `Authorization: Bearer TOKEN`
    --target NAME       server adapter                                              [hub]
    --connect-timeout S deadline of one connection to get its stream going          [30]
    --drain-timeout S   after the last publish, how long to wait for missing events [10]
    --redis-url URL     the hub's Redis: `generations` appends tokens to it as producers do; `reconnect-storm`
                        counts the store commands the storm cost on it
    --key-prefix P      the hub's --key-prefix                                        [hub:]
    --coalesce-ms MS    generations: the producer's coalescing window                 [5]
    --source-addresses A
                        local addresses the subscribers connect from, in turn (A, or a range A-B): one source
                        address reaches one server address from ~28,000 ports; e.g. 127.0.0.2-127.0.0.9

Exit status: 0 when every check passed, 1 when the run found problems (lost, duplicate or reordered events, failed
connections, publish errors) or could not finish, 2 for bad settings or a file limit too low, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import uvloop

from .adapters import ADAPTERS
from .plot import plot_missing, write_plot
from .report import build_result, write_outputs
from .runner import Run, WorkerError
from .scenario import SCENARIOS, Scenario
from .settings import LoadSettings, address_range

__all__ = ["fd_limit_problem", "main", "settings_from_args"]

ENV_PREFIX = "LOADTEST_"

# flag → (LoadSettings field, converter); lists (tuple fields) accept commas and repeats.
_FLAGS: dict[str, tuple[str, type]] = {
    "url": ("urls", str),
    "connections": ("connections", int),
    "channels": ("channels", int),
    "ramp": ("ramp_per_s", float),
    "rate": ("rate_per_s", float),
    "batch": ("batch", int),
    "payload": ("payload_bytes", int),
    "duration": ("duration_s", float),
    "events": ("events", int),
    "workers": ("workers", int),
    "pid": ("pids", int),
    "metrics-url": ("metrics_urls", str),
    "json": ("json_out", str),
    "markdown": ("markdown_out", str),
    "plot": ("plot_out", str),
    "token": ("token", str),
    "target": ("target", str),
    "connect-timeout": ("connect_timeout_s", float),
    "drain-timeout": ("drain_timeout_s", float),
    "redis-url": ("redis_url", str),
    "key-prefix": ("key_prefix", str),
    "coalesce-ms": ("coalesce_ms", float),
    "source-addresses": ("source_addresses", str),
}
_LISTS = {"url", "pid", "metrics-url", "source-addresses"}


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load tester for the SSE hub. " + "; ".join(f"{n}: {c.summary}" for n, c in SCENARIOS.items()),
    )
    ap.add_argument("scenario", nargs="?", help=f"{' | '.join(SCENARIOS)} [{_env_name('scenario')}]")
    for flag in _FLAGS:
        action = "append" if flag in _LISTS else "store"
        ap.add_argument(f"--{flag}", dest=flag, action=action, default=None, help=f"[{_env_name(flag)}]")
    return ap


def settings_from_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[LoadSettings, Scenario]:
    """Flags over LOADTEST_* variables over the scenario's defaults over LoadSettings' defaults."""
    ns = _parser().parse_args(argv)
    name = ns.scenario or environ.get(_env_name("scenario"))
    if not name:
        raise ValueError("give a scenario: " + ", ".join(SCENARIOS))
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    scenario = SCENARIOS[name]()
    values: dict[str, Any] = dict(scenario.defaults)
    for flag, (field_name, kind) in _FLAGS.items():
        raw: Any = getattr(ns, flag)
        if raw is None:
            env = environ.get(_env_name(flag), "")
            raw = [env] if flag in _LISTS and env else (env or None)
        if raw is None:
            continue
        values[field_name] = _convert(flag, kind, raw)
    if "source_addresses" in values:
        values["source_addresses"] = tuple(a for spec in values["source_addresses"] for a in address_range(spec))
    if values.get("target", "hub") not in ADAPTERS:
        raise ValueError(f"unknown --target {values['target']!r}; known: {', '.join(ADAPTERS)}")
    settings = LoadSettings(scenario=name, **values)
    scenario.check(settings)
    if settings.plot_out and (why := plot_missing()) is not None:
        raise ValueError(why)
    return settings, scenario


def _convert(flag: str, kind: type, raw: str | list[str]) -> Any:
    try:
        if isinstance(raw, list):
            return tuple(kind(part.strip()) for item in raw for part in item.split(",") if part.strip())
        return kind(raw)
    except ValueError:
        raise ValueError(f"invalid setting --{flag} ({_env_name(flag)}): {raw!r} is not a {kind.__name__}") from None


def fd_limit_problem(needed: int, soft: int, hard: int, settings: LoadSettings) -> str | None:
    """Why the file limit cannot hold the connections, or None when raising the soft limit to `hard` is enough."""
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return None
    return (
        f"{settings.connections} connections over {settings.client_workers} worker processes need about {needed} "
        f"open files per process, but the hard limit (RLIMIT_NOFILE) is {hard} (soft {soft}). Raise it in the shell "
        f"that starts the load test, e.g. `ulimit -n {needed}` (beyond the current hard limit this needs root, or "
        "an entry in /etc/security/limits.conf), or spread the connections over more --workers."
    )


def _raise_fd_limit(needed: int, settings: LoadSettings) -> str | None:
    # Workers inherit the limit: raising it here, before they are spawned, raises it for all of them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    problem = fd_limit_problem(needed, soft, hard, settings)
    if problem is None and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return problem


def _port_range_warning(settings: LoadSettings) -> str | None:
    # Every connection from this host to one server address takes one local port from this range.
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    pairs = len({urlsplit(u).netloc for u in settings.urls}) * max(1, len(settings.source_addresses))
    per_pair = settings.connections / pairs
    if per_pair <= high - low + 1:
        return None
    return (
        f"warning: {per_pair:.0f} connections from one source address to one server address exceed the "
        f"{high - low + 1} local ports of net.ipv4.ip_local_port_range ({low}-{high}); connections will fail with "
        "EADDRNOTAVAIL: spread them with --source-addresses (on loopback, e.g. 127.0.0.2-127.0.0.9)"
    )


def _command(argv: Sequence[str]) -> list[str]:
    """The command line for the report, with the token left out."""
    out = ["python", "-m", "loadtest"]
    hide = False
    for arg in argv:
        out.append("***" if hide else ("--token=***" if arg.startswith("--token=") else arg))
        hide = arg == "--token"
    return out


async def _run(settings: LoadSettings, scenario: Scenario, command: list[str]) -> tuple[int, dict[str, Any] | None]:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    interrupted: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        # Once: the cleanup that follows (stop, terminate, kill the workers) is bounded, and must not be cut short.
        if not interrupted:
            interrupted.append(sig)
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    started_at = time.time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        run = Run(settings, session=session)
        progress = asyncio.create_task(run.progress())
        try:
            outcome = await scenario.run(run)
        except asyncio.CancelledError:
            if not interrupted:
                raise
            main.uncancel()
            print(f"\npython -m loadtest: interrupted ({interrupted[0].name}); stopping the workers", file=sys.stderr)
            return 130, None
        except WorkerError as e:
            print(f"\npython -m loadtest: {e}", file=sys.stderr)
            return 1, None
        finally:
            progress.cancel()
            run.end_progress()
            await run.close()
    result = build_result(
        settings, outcome, run_id=run.run_id, started_at=started_at, command=command, timeline=run.timeline
    )
    return (0 if result["ok"] else 1), result


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, scenario = settings_from_args(argv, os.environ)
    except ValueError as e:
        print(f"python -m loadtest: {e}", file=sys.stderr)
        return 2
    problem = _raise_fd_limit(scenario.fds_per_worker(settings), settings)
    if problem is not None:
        print(f"python -m loadtest: {problem}", file=sys.stderr)
        return 2
    warning = _port_range_warning(settings)
    if warning is not None:
        print(f"python -m loadtest: {warning}", file=sys.stderr)
    code, result = uvloop.run(_run(settings, scenario, _command(sys.argv[1:] if argv is None else argv)))
    if result is not None:
        print(write_outputs(result, settings.json_out, settings.markdown_out))
        if settings.plot_out:
            write_plot(result, settings.plot_out)
        if result["problems"]:
            print("python -m loadtest: problems: " + "; ".join(result["problems"]), file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
