"""docs/configuration.md against the settings classes: every setting of the hub and of the worker is in its table with
its flag and its default, and the tables list no flag that does not exist."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from hub.settings import HubSettings
from producer.settings import ProducerSettings
from tests.support import ROOT

DOC = ROOT / "docs" / "configuration.md"
# The section of each process: from its `## ` heading to the next one.
SECTIONS: dict[str, type[Any]] = {"python -m hub": HubSettings, "python -m producer": ProducerSettings}


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table row; a `|` inside backticks is text, not a border."""
    cells, cell, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    cells.append(cell.strip())
    return cells


def _section(text: str, title: str) -> str:
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    found = [p for p in parts if title in p.splitlines()[0]]
    assert len(found) == 1, f"one `## ` section of {DOC.name} names {title!r}"
    return found[0]


def documented(title: str) -> list[tuple[list[str], list[str]]]:
    """Each table row of a section that documents flags: (its flags, its defaults)."""
    rows = []
    for line in _section(DOC.read_text(), title).splitlines():
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        flags = re.findall(r"`--([a-z0-9-]+)`", cells[0])
        if not flags:
            continue  # the header and its rule
        assert len(cells) == 3, f"flag | default | meaning: {line}"
        rows.append((flags, re.findall(r"`([^`]*)`", cells[1]) or [cells[1]]))
    return rows


def shown(value: Any) -> str:
    """A default as the tables show it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "":
        return "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_a_default_is_shown_as_a_user_types_it() -> None:
    assert [shown(v) for v in (True, False, None, "", 86_400.0, 0.25, 1 << 20, "hub:")] == [
        "on",
        "off",
        "(none)",
        "(none)",
        "86400",
        "0.25",
        "1048576",
        "hub:",
    ]


@pytest.mark.parametrize("title", SECTIONS)
def test_every_setting_is_documented_once_with_its_flag_and_default(title: str) -> None:
    fields = {f.metadata["flag"]: f for f in dataclasses.fields(SECTIONS[title])}
    seen: dict[str, str] = {}
    for flags, defaults in documented(title):
        # `--demo` / `--no-demo`: the negative form argparse offers for a boolean setting is not a setting of its own.
        negatives = [f for f in flags if f.startswith("no-") and f[3:] in flags]
        assert all(fields[f[3:]].type in ("bool", bool) for f in negatives), f"--no-<flag> of a non-boolean: {flags}"
        flags = [f for f in flags if f not in negatives]
        unknown = [f for f in flags if f not in fields]
        assert not unknown, f"{title}: documented flags that do not exist: {unknown}"
        # One default per flag, or one default for all the row's flags.
        assert len(defaults) in (1, len(flags)), f"{flags}: defaults {defaults}"
        for flag, default in zip(flags, defaults * len(flags) if len(defaults) == 1 else defaults, strict=True):
            assert flag not in seen, f"--{flag} is documented twice"
            seen[flag] = default
    assert sorted(set(fields) - set(seen)) == [], f"{title}: settings missing from {DOC.name}"
    wrong = {f: (seen[f], shown(fields[f].default)) for f in fields if seen[f] != shown(fields[f].default)}
    assert not wrong, f"{title}: documented default != the code's (flag: (documented, code)): {wrong}"


def test_the_reader_finds_grouped_rows_and_escaped_borders() -> None:
    assert _cells("| `--a`, `--b` / `--c` | `1` / `x|y` | m |") == ["`--a`, `--b` / `--c`", "`1` / `x|y`", "m"]
