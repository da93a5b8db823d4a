"""The demo model, which needs no network: what it says, and what a "demo:N" model asks for.

The job contract checks a demo job's model with it (the hub refuses a bad one before queueing); the demo provider
streams it. Model "demo" (or empty) is the text once; "demo:N" is N tokens (1 to DEMO_MAX_TOKENS), cycling through it.
Given tools, the demo model calls one with arguments made from its JSON Schema (`sample_arguments`), and answers a
tool's result by quoting it (`tool_answer`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .chat import content_text

__all__ = [
    "CALL_TEXT",
    "DEMO_MAX_TOKENS",
    "TEXT",
    "TOKENS",
    "demo_tokens",
    "sample_arguments",
    "tool_answer",
    "words",
]

TEXT = (
    "Server-Sent Events are a simple way to stream text from a server to a browser. Each token of this answer is "
    "appended to a Redis Stream, and the stream's entry id becomes the event id, so a browser that loses its "
    "connection reconnects with Last-Event-ID and receives exactly the tokens it missed, from any hub node. The "
    "generation itself runs in a worker, apart from any browser: close the tab, reload the page, or stop a hub node, "
    "and the answer still arrives whole. When it is finished, the last event closes the channel, and a reconnect "
    "after it is told there is nothing more to wait for."
)
_WORD = re.compile(r"\s*\S+")
TOKENS = _WORD.findall(TEXT)
# What the demo model says before it calls a tool.
CALL_TEXT = "Let me check."
# A demo generation holds a worker slot as long as it runs: 100,000 tokens take 56 minutes at the default 30/s.
DEMO_MAX_TOKENS = 100_000
_DEMO_N = re.compile(r"demo:([1-9][0-9]{0,5})")
# String samples by property name; any other string is "demo".
_STRINGS = {
    "city": "Paris",
    "location": "Paris",
    "place": "Paris",
    "country": "France",
    "timezone": "Europe/Paris",
    "zone": "Europe/Paris",
    "language": "en",
    "date": "2026-01-01",
}
# A schema nested deeper than this gets {} there: a request's schema must not exhaust the recursion limit.
_MAX_DEPTH = 32


def demo_tokens(model: str) -> int:
    """How many tokens model `model` streams: the text once for any model but "demo:N", N for that. Raises ValueError
    for a "demo:" model whose N is not a whole number from 1 to DEMO_MAX_TOKENS."""
    if not model.startswith("demo:"):
        return len(TOKENS)
    found = _DEMO_N.fullmatch(model)
    if found is None or int(found[1]) > DEMO_MAX_TOKENS:
        raise ValueError(f'the demo model is "demo" or "demo:N" with N from 1 to {DEMO_MAX_TOKENS}')
    return int(found[1])


def words(text: str) -> list[str]:
    """`text` as the demo model streams it: word by word, each word with the spaces before it."""
    return _WORD.findall(text)


def sample_arguments(schema: Any, depth: int = 0) -> dict[str, Any]:
    """Arguments for a tool whose parameters are JSON Schema `schema`: a sample of each required property (strings
    fitting their name, numbers 1, booleans true, enums their first value, objects recursively)."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = schema.get("required")
    names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
    return {name: _sample(name, properties.get(name), depth + 1) for name in names}


def _sample(name: str, schema: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return {}
    if not isinstance(schema, dict):
        return _STRINGS.get(name.lower(), "demo")
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for options in ("anyOf", "oneOf"):
        if isinstance(schema.get(options), list) and schema[options]:
            return _sample(name, schema[options][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the first that is not null
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        return sample_arguments(schema, depth)
    if kind == "array":
        return [_sample(name, schema.get("items"), depth + 1)]
    samples: dict[str, Any] = {"integer": 1, "number": 1, "boolean": True, "null": None}
    return samples[kind] if isinstance(kind, str) and kind in samples else _STRINGS.get(name.lower(), "demo")


def _call_names(messages: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The tool name of each call id of the assistant messages."""
    names: dict[str, str] = {}
    for m in messages:
        for call in m.get("tool_calls") or ():
            names[call["id"]] = call["function"]["name"]
    return names


def tool_answer(messages: Sequence[Mapping[str, Any]]) -> str:
    """The demo model's answer to the tool results that end `messages`: it quotes each."""
    names = _call_names(messages)
    results: list[str] = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        name = names.get(m.get("tool_call_id", ""), "")
        tool = f"The {name} tool" if name else "The tool"
        results.insert(0, f"{tool} said: {content_text(m.get('content'))}.")
    return " ".join(results)
