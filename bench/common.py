"""What the benchmarks share beyond tests.processes (ports, services, Redis): a process's CPU time from /proc, and the
Markdown report they print as they go."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Report", "cpu_seconds"]

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@dataclass
class Report:
    lines: list[str]

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path: Path | None) -> None:
        """Write the report to `path` (the script's --out), if given."""
        if path is not None:
            path.write_text("\n".join(self.lines) + "\n")
