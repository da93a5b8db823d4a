"""Figures: the result of a run as one JSON document (every figure) and as a Markdown table, plus the figure helpers
the scenarios share (latency percentiles, connection counts, hub RSS and CPU over a window).

Units are in the key names (`_ms`, `_bytes`, `_s`, `_us`), as everywhere in the project.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .accounting import Histogram, Tick
from .probe import ProcSample, lag_p99_bound_ms, metrics_delta
from .settings import LoadSettings

__all__ = [
    "Outcome",
    "build_result",
    "connection_figures",
    "fmt_latency",
    "hub_figures",
    "latency_ms",
    "render_markdown",
    "write_outputs",
]

_PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class Outcome:
    """What a scenario measured: JSON sections, the Markdown rows that summarize them, and what went wrong."""

    sections: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def latency_ms(h: Histogram) -> dict[str, float | int | None]:
    """Sample count, nearest-rank p50/p90/p99, min, max and mean of a microsecond histogram, in milliseconds."""
    if not h:
        return {"samples": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "min_ms": None, "max_ms": None}
    p50, p90, p99 = h.percentiles(_PERCENTILES)
    return {
        "samples": h.count,
        "p50_ms": p50 / 1000,
        "p90_ms": p90 / 1000,
        "p99_ms": p99 / 1000,
        "min_ms": h.min() / 1000,
        "max_ms": h.max() / 1000,
        "mean_ms": round(h.mean() / 1000, 3),
    }


def fmt_latency(figures: dict[str, Any]) -> str:
    """`p50 / p90 / p99 / max` of a latency_ms() dict, for a table cell."""
    if not figures.get("samples"):
        return "no samples"
    return " / ".join(f"{figures[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")) + " ms"


def connection_figures(requested: int, totals: Tick, dropped: int) -> dict[str, Any]:
    return {
        "requested": requested,
        "opened": totals.opened,
        "failed": totals.failed,
        "dropped": dropped,
        "errors": dict(sorted(totals.errors.items())),
        "connect_ms": latency_ms(totals.connect_us),
    }


def connection_rows(c: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (
            "connections requested / opened / failed / dropped",
            f"{c['requested']} / {c['opened']} / {c['failed']} / {c['dropped']}",
        ),
        ("connect time p50 / p90 / p99 / max", fmt_latency(c["connect_ms"])),
    ]
    if c["errors"]:
        rows.append(("errors", ", ".join(f"{k} {v}" for k, v in c["errors"].items())))
    return rows


def hub_figures(
    pids: Sequence[int],
    before: ProcSample | None,
    after: ProcSample | None,
    peak_rss_bytes: int,
    *,
    count: int = 0,
    per: str | None = None,
    metrics_before: dict[str, float] | None = None,
    metrics_after: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Hub RSS and CPU (user + system) over a window, and the CPU per `per` (delivery, event) of the `count` of them
    that happened in it."""
    out: dict[str, Any] = {"pids": list(pids)}
    if before is not None and after is not None:
        cpu_s = after.cpu_s - before.cpu_s
        window_s = after.at_s - before.at_s
        out |= {
            "rss_before_bytes": before.rss_bytes,
            "rss_after_bytes": after.rss_bytes,
            "rss_peak_bytes": peak_rss_bytes,
            "cpu_s": round(cpu_s, 3),
            "window_s": round(window_s, 3),
            "cpu_percent": round(cpu_s / window_s * 100, 1) if window_s > 0 else None,
        }
        if per is not None:
            out[f"cpu_us_per_{per}"] = round(cpu_s * 1e6 / count, 2) if count else None
    if metrics_before is not None and metrics_after is not None:
        out["metrics"] = metrics_delta(metrics_before, metrics_after)
        out["lag_p99_bound_ms"] = lag_p99_bound_ms(out["metrics"])
    return out


def hub_rows(h: dict[str, Any], per: str) -> list[tuple[str, str]]:
    if "cpu_s" not in h:
        return []
    mib = 2**20
    cost = h.get(f"cpu_us_per_{per}")
    return [
        (
            "hub RSS before / after / peak",
            f"{h['rss_before_bytes'] / mib:.1f} / {h['rss_after_bytes'] / mib:.1f} / {h['rss_peak_bytes'] / mib:.1f} "
            "MiB",
        ),
        ("hub CPU (user + system)", f"{h['cpu_s']:.2f} s over {h['window_s']:.1f} s ({h['cpu_percent']}%)"),
        (f"hub CPU per {per}", f"{cost:.1f} µs" if cost is not None else "n/a"),
    ]


def _settings_dict(settings: LoadSettings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    if d.get("token"):
        d["token"] = "(set)"
    return d


def build_result(
    settings: LoadSettings,
    outcome: Outcome,
    *,
    run_id: str,
    started_at: float,
    command: Sequence[str],
    timeline: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The JSON document of a run."""
    return {
        "scenario": settings.scenario,
        "run_id": run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "command": list(command),
        "machine": {
            "system": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": _settings_dict(settings),
        "ok": not outcome.problems,
        "problems": outcome.problems,
        **outcome.sections,
        "rows": [list(r) for r in outcome.rows],
        "timeline": list(timeline),
    }


def render_markdown(result: dict[str, Any]) -> str:
    """The run as Markdown: a line on what ran where, the table of figures, and the problems if any."""
    s = result["settings"]
    m = result["machine"]
    lines = [
        f"# Load test: {result['scenario']}",
        "",
        f"{result['started_at']}, run `{result['run_id']}`: `{' '.join(result['command'])}`. Target {s['target']} at "
        f"{', '.join(s['urls'])}; {s['workers']} client workers on {m['system']}, {m['cpus']} CPUs, "
        f"Python {m['python']}.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in result["rows"]),
        "",
    ]
    if result["problems"]:
        lines += ["Problems:", "", *(f"- {p}" for p in result["problems"]), ""]
    else:
        lines += ["No problems: every check of this scenario passed.", ""]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], json_out: str | None, markdown_out: str | None) -> str:
    """Write the JSON and Markdown files asked for; return the Markdown."""
    markdown = render_markdown(result)
    if json_out:
        Path(json_out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    if markdown_out:
        Path(markdown_out).write_text(markdown)
    return markdown
