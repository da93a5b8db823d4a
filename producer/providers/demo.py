"""DemoProvider: streams a built-in answer at a set pace, with no network, so a hub shows real generations offline.

Model "demo" (or empty) streams the text once; "demo:N" streams N tokens (1 to DEMO_MAX_TOKENS), cycling through it
(for load tests and long generations). Given `tools` (and a `tool_choice` other than "none"), it says a few words and
calls the chosen tool, or the first, with arguments made from the tool's schema, in fragments, finishing with
"tool_calls"; when the last message is a tool result, it answers by quoting it. With `reasoning_effort` it first
streams a short reasoning. `max_tokens` ends it early with finish_reason "length" (a tool call is made whole or not
at all). Token counts are words.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import aiohttp

from ssecore.chat import content_text
from ssecore.demo import CALL_TEXT, DEMO_MAX_TOKENS, TOKENS, demo_tokens, sample_arguments, tool_answer, words

from .base import (
    Finish,
    GenerationRequest,
    ProviderError,
    ReasoningDelta,
    StreamItem,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
)

__all__ = ["DEMO_MAX_TOKENS", "DemoProvider", "demo_tokens"]

_YIELD_EVERY = 32
_FRAGMENTS = 3  # a call's arguments stream in at most this many pieces


@dataclass(frozen=True, slots=True)
class _Step:
    """Items that count as `words` tokens and are made whole or not at all (one word of text; one tool call)."""

    items: tuple[StreamItem, ...]
    words: int
    reasoning: bool = False


def _text_steps(text: str, *, reasoning: bool = False) -> Iterator[_Step]:
    for word in words(text):
        yield _Step((ReasoningDelta(word) if reasoning else TextDelta(word),), 1, reasoning)


def _plain(count: int) -> Iterator[_Step]:
    for i in range(count):
        text = TOKENS[i % len(TOKENS)]
        yield _Step((TextDelta(text if i or not text.startswith(" ") else text.lstrip()),), 1)


def _chosen_tool(request: GenerationRequest) -> Mapping[str, Any] | None:
    """The function the demo model calls: None when it answers in text."""
    tools = request.tools or ()
    if not tools or request.tool_choice == "none" or request.messages[-1].get("role") == "tool":
        return None
    choice = request.tool_choice
    name = choice["function"]["name"] if isinstance(choice, Mapping) else tools[0]["function"]["name"]
    function: Mapping[str, Any] = next(t["function"] for t in tools if t["function"]["name"] == name)
    return function


def _fragments(arguments: str) -> list[str]:
    """`arguments` cut into 2 or 3 pieces (one if it is a single character), as a provider streams them."""
    n = min(_FRAGMENTS, len(arguments))
    size = -(-len(arguments) // n)  # rounded up
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def _call(name: str, arguments: str) -> _Step:
    pieces = _fragments(arguments)
    deltas = [ToolCallDelta(0, pieces[0], name=name)] + [ToolCallDelta(0, p) for p in pieces[1:]]
    return _Step((*deltas, ToolCallEnd(0)), len(arguments.split()))


def _reasoning(request: GenerationRequest, call: tuple[str, str] | None) -> str:
    """What the demo model thinks it will do."""
    if call is not None:
        return f"This needs a tool: I will call {call[0]} with {call[1]}, then answer from its result."
    if request.messages[-1].get("role") == "tool":
        return "The tool has answered: I will pass its result on, word for word."
    return "I will explain how the hub streams an answer, token by token."


def _answer(request: GenerationRequest, count: int) -> tuple[Iterable[_Step], str]:
    """The answer's steps, and its finish_reason if it is not cut short."""
    function = _chosen_tool(request)
    call = (function["name"], json.dumps(sample_arguments(function.get("parameters")))) if function else None
    thinking = _text_steps(_reasoning(request, call), reasoning=True) if request.reasoning_effort else iter(())
    if call is not None:
        return [*thinking, *_text_steps(CALL_TEXT), _call(*call)], "tool_calls"
    if request.messages[-1].get("role") == "tool":
        return [*thinking, *_text_steps(tool_answer(request.messages))], "stop"
    return chain(thinking, _plain(count)), "stop"


class DemoProvider:
    name = "demo"
    kind = "demo"

    def __init__(self, tokens_per_s: float = 30.0) -> None:
        self._delay_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0

    async def _pace(self, sent: int) -> None:
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        elif sent % _YIELD_EVERY == 0:
            await asyncio.sleep(0)  # full speed still lets the rest of the process run

    async def stream(
        self, session: aiohttp.ClientSession, request: GenerationRequest
    ) -> AsyncGenerator[StreamItem, None]:
        try:
            count = demo_tokens(request.model)
        except ValueError as e:
            # The hub refuses such a job; one that reached the queue another way must not hold a slot for ever either.
            raise ProviderError("bad_request", str(e)) from None
        steps, reason = _answer(request, count)
        limit = request.max_tokens
        prompt = sum(len(content_text(m.get("content")).split()) for m in request.messages)
        used = thought = sent = 0
        for step in steps:
            if limit is not None and used + step.words > limit:
                reason = "length"
                break
            for item in step.items:
                if not isinstance(item, ToolCallEnd):  # a call's end has no text of its own: no pause for it
                    await self._pace(sent)
                    sent += 1
                yield item
            used += step.words
            thought += step.words if step.reasoning else 0
        yield Finish(reason, input_tokens=prompt, output_tokens=used, reasoning_tokens=thought or None)
