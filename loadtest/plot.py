"""`--plot FILE`: a PNG of a run over time — publish-to-receipt latency (p50, p99) and throughput (delivered and
published events per second), one point per progress tick, with the phases marked.

matplotlib is an optional extra (`pip install 'sse-hub[plot]'`); it is imported only when a plot is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plot_missing", "write_plot"]


def plot_missing() -> str | None:
    """Why --plot cannot work here (matplotlib is not installed), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, an optional extra: pip install 'sse-hub[plot]' (or pip install matplotlib)"
    return None


def write_plot(result: Mapping[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to the file
    import matplotlib.pyplot as plt

    timeline: Sequence[Mapping[str, Any]] = result.get("timeline", [])
    t = [p["t_s"] for p in timeline]
    fig, (lat, thr) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5), constrained_layout=True)
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        lat.plot(t, [p.get(key) if p.get(key) is not None else float("nan") for p in timeline], label=label)
    lat.set_ylabel("publish → receipt (ms)")
    lat.set_yscale("symlog", linthresh=10)
    lat.legend(loc="upper left")
    for key, label in (("delivered_per_s", "delivered/s"), ("published_per_s", "published/s")):
        thr.plot(t, [p.get(key, 0) for p in timeline], label=label)
    thr.set_ylabel("events per second")
    thr.set_xlabel("seconds since start")
    thr.legend(loc="upper left")
    # A faint line where each phase begins (connect, publish, storm, drain, …).
    previous = None
    for p in timeline:
        if p["phase"] != previous:
            for ax in (lat, thr):
                ax.axvline(p["t_s"], color="grey", alpha=0.3, linewidth=0.8)
            lat.annotate(p["phase"], (p["t_s"], 1), xycoords=("data", "axes fraction"), fontsize=8, va="top")
            previous = p["phase"]
    s = result["settings"]
    fig.suptitle(f"{result['scenario']}: {s['connections']} connections, {s['channels']} channels ({result['run_id']})")
    fig.savefig(path, dpi=90)
    plt.close(fig)
