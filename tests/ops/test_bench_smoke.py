"""The benchmarks of `make bench` that start their own servers, at their smallest: bench/formats.py (every protocol
delivers every token of every answer, which the script checks) and bench/publish_path.py; each table has its rows.
The figures themselves are `make bench`'s to report, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.e2e


def _table_rows(script: str, *flags: str, out: Path) -> list[str]:
    """Run a benchmark at its smallest; the first cell of each figure row of its report."""
    command = [sys.executable, f"bench/{script}", *flags, "--rounds", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "µs" in line]
    return [row.split(" | ")[0] for row in rows]


def test_the_protocols_benchmark_runs_and_reports_each_protocol(tmp_path: Path) -> None:
    flags = ("--generations", "4", "--tokens", "6", "--tokens-per-s", "200")
    assert _table_rows("formats.py", *flags, out=tmp_path / "formats.md") == [
        "| native SSE (POST /v1/generations)",
        "| OpenAI Chat Completions (POST /v1/chat/completions)",
        "| OpenAI Responses (POST /v1/responses)",
        "| Vercel AI SDK UI messages (POST /v1/ai-sdk/chat)",
    ]


def test_the_publish_path_benchmark_runs_and_reports_each_server(tmp_path: Path) -> None:
    flags = ("--rates", "50", "--seconds", "0.5")
    assert _table_rows("publish_path.py", *flags, out=tmp_path / "publish-path.md") == [
        "| bare uvloop protocol",
        "| bare aiohttp handler",
        "| hub publish, no subscriber",
        "| hub publish, 10 subscribers",
    ]
