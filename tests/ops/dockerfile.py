"""Reading the Dockerfile and .dockerignore as data, the way Docker does, for the parts this project uses:
instructions with line continuations, stages, and the build context that .dockerignore leaves."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Instruction", "Stage", "context_includes", "parse_dockerfile"]


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the (joined) line, with ARG defaults substituted in FROM

    def exec_form(self) -> list[str] | None:
        """The JSON array of a CMD/ENTRYPOINT/RUN in exec form, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            found = re.search(r"(?:^|\s)CMD\s+(.*)\Z", text)
            text = found[1] if found else ""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def options(self) -> dict[str, str]:
        """Leading `--name=value` options (COPY --from=..., HEALTHCHECK --interval=...)."""
        return dict(re.findall(r"--([a-z-]+)=(\S+)", re.split(r"(?:^|\s)CMD\s", self.args, maxsplit=1)[0]))

    def operands(self) -> list[str]:
        """The words after the options (COPY's sources and destination)."""
        return [w for w in self.args.split() if not w.startswith("--")]


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for i in self.all("ENV"):
            values.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", i.args))
        return values


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (and parser directives) may sit inside a continued instruction too
        if stripped.endswith("\\"):
            current += stripped[:-1].strip() + " "
            continue
        lines.append((current + stripped).strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, in order. Global ARGs (before the first FROM) are substituted in FROM lines."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m[1] or m[2], ""), args.split()[0])
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=image, name=name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, value = args.partition("=")
            global_args[name] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Go's filepath.Match plus `**`, as Docker's pattern matcher: `*` and `?` stop at `/`, `**` crosses it.
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            out += "[" + pattern[i + 1 : end].replace("\\", "\\\\") + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def context_includes(dockerignore: Path, relpath: str) -> bool:
    """Whether a file at `relpath` (relative to the context root, `/`-separated) is sent to the build. As Docker: the
    patterns are anchored at the root; one that matches a parent directory matches its whole tree; the last matching
    pattern decides, and `!` makes it an inclusion."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in dockerignore.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = pattern.strip("/")
        rules.append((negated, _pattern_regex(pattern)))
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            included = negated
    return included
