"""One answer as it streams: each provider item becomes its channel event, and the whole assistant message builds up
beside them, for the terminal `done` and the generation's record.

Events: `token`, `reasoning`, `refusal` {"text"}; `tool_call_delta` {"index", "id"?, "name"?, "arguments"} (id and
name with a call's first fragment); `tool_call` {"index", "id", "name", "arguments"} once a call is complete.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ssecore.backend import NewEvent

from .providers.base import Finish, ReasoningDelta, RefusalDelta, StreamItem, TextDelta, ToolCallDelta, ToolCallEnd

__all__ = ["Answer", "event", "usage_of"]


def event(name: str, data: Mapping[str, Any]) -> NewEvent:
    return NewEvent(name, orjson.dumps(data).decode())


def usage_of(finish: Finish | None) -> dict[str, int | None]:
    """The `usage` of `done`: input and output tokens always (null when unknown), the finer counts where known."""
    if finish is None:
        return {"input_tokens": None, "output_tokens": None}
    usage: dict[str, int | None] = {"input_tokens": finish.input_tokens, "output_tokens": finish.output_tokens}
    if finish.reasoning_tokens is not None:
        usage["reasoning_tokens"] = finish.reasoning_tokens
    if finish.cached_input_tokens is not None:
        usage["cached_input_tokens"] = finish.cached_input_tokens
    return usage


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    ended: bool = False

    def parses(self) -> bool:
        try:
            orjson.loads("".join(self.arguments) or "{}")
        except orjson.JSONDecodeError:
            return False
        return True

    def whole(self, index: int) -> dict[str, Any]:
        # A call without arguments is an empty object, as OpenAI sends it: a client can always parse it.
        return {"index": index, "id": self.id, "name": self.name, "arguments": "".join(self.arguments) or "{}"}


class Answer:
    """The events of one provider stream and the assistant message they make. `kind`: the provider's kind, the key of
    its state in the message's `provider_state`."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._refusal: list[str] = []
        self._calls: dict[int, _Call] = {}

    def events(self, item: StreamItem) -> list[NewEvent]:
        """The channel events of one stream item (a Finish gives the `tool_call`s of calls still open)."""
        if isinstance(item, TextDelta):
            self._text.append(item.text)
            return [event("token", {"text": item.text})]
        if isinstance(item, ReasoningDelta):
            self._reasoning.append(item.text)
            return [event("reasoning", {"text": item.text})]
        if isinstance(item, RefusalDelta):
            self._refusal.append(item.text)
            return [event("refusal", {"text": item.text})]
        if isinstance(item, ToolCallDelta):
            return [self._delta(item)]
        if isinstance(item, ToolCallEnd):
            return self._end(item.index)
        # The Finish completes the calls still open, except one the output cap cut off mid-arguments: it is no call
        # (its JSON is unfinished, and the next turn could not send it back); it stays out of the message.
        cut = item.finish_reason == "length"
        return [e for i, c in sorted(self._calls.items()) if not (cut and not c.parses()) for e in self._end(i)]

    def _delta(self, item: ToolCallDelta) -> NewEvent:
        call = self._calls.get(item.index)
        data: dict[str, Any] = {"index": item.index}
        if call is None:
            call = self._calls[item.index] = _Call(item.id or _call_id(), item.name or "")
            data["id"], data["name"] = call.id, call.name
        elif item.name and not call.name:
            call.name = data["name"] = item.name  # a server that names the call after its first fragment
        call.arguments.append(item.arguments)
        data["arguments"] = item.arguments
        return event("tool_call_delta", data)

    def _end(self, index: int) -> list[NewEvent]:
        call = self._calls.get(index)
        if call is None or call.ended:
            return []
        call.ended = True
        return [event("tool_call", call.whole(index))]

    def message(self, finish: Finish | None = None) -> dict[str, Any]:
        """The assistant message so far, in the request's own shape: sent back verbatim, it continues the
        conversation. Calls never completed (a cancelled answer) are left out."""
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": "".join(c.arguments) or "{}"}}
            for _, c in sorted(self._calls.items())
            if c.ended
        ]
        text = "".join(self._text)
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        if self._reasoning:
            message["reasoning"] = "".join(self._reasoning)
        if self._refusal:
            message["refusal"] = "".join(self._refusal)
        if finish is not None and finish.provider_state:
            message["provider_state"] = {self._kind: dict(finish.provider_state)}
        return message
