"""OpenAI Responses API streaming (`POST {base_url}/responses`), with the same key and base URL as `openai`.

Wire format: named events, each also naming itself in its JSON `type`. An answer is a list of output items (reasoning,
message, function_call), each opened by `response.output_item.added` and closed by `response.output_item.done`;
their content streams as `response.output_text.delta`, `response.refusal.delta`,
`response.reasoning_summary_text.delta` (or `response.reasoning_text.delta`) and
`response.function_call_arguments.delta`. The stream ends with `response.completed`, `response.incomplete` or
`response.failed` (there is no `[DONE]`); an `error` event may come at any point. Other event types are ignored.

Requests are stateless (`store: false`): the whole conversation goes each time, and the model's reasoning travels as
encrypted reasoning items kept in `done.message.provider_state["openai-responses"]["reasoning"]`.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping, Sequence
from typing import Any

from producer.providers._http import StreamDecoder, clean_message, load_object, truncated
from producer.providers.base import (
    Finish,
    GenerationRequest,
    ProviderError,
    ReasoningDelta,
    RefusalDelta,
    StreamItem,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
)
from producer.providers.openai import OpenAIProvider
from ssecore.chat import assistant_state, content_text, data_url_mime
from ssecore.sse import SSEEvent

__all__ = ["KIND", "OpenAIResponsesProvider"]

KIND = "openai-responses"

# response.incomplete's incomplete_details.reason -> finish_reason.
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}
# Error codes (of `error` events and of a failed response's `error`) -> (our code, whether a new attempt may succeed).
_STREAM_ERRORS: dict[str, tuple[str, bool]] = {
    "server_error": ("server_error", True),
    "rate_limit_exceeded": ("rate_limited", True),
    "overloaded": ("overloaded", True),
    "overloaded_error": ("overloaded", True),
    # Money, not rate: retrying cannot help until someone pays.
    "insufficient_quota": ("quota_exhausted", False),
    "billing_hard_limit_reached": ("quota_exhausted", False),
    "billing_not_active": ("quota_exhausted", False),
}


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _details(usage: Mapping[str, Any], key: str, field: str) -> int | None:
    details = usage.get(key)
    return _int_or_none(details.get(field)) if isinstance(details, dict) else None


def _kept_reasoning(item: Mapping[str, Any]) -> dict[str, Any] | None:
    """A finished reasoning item as the next request must send it back, or None when it cannot be: without
    `encrypted_content` it would be a reference to a stored item, and nothing is stored (`store: false`)."""
    encrypted = item.get("encrypted_content")
    if not isinstance(encrypted, str) or not encrypted:
        return None
    summary = item.get("summary")
    kept: dict[str, Any] = {"type": "reasoning", "encrypted_content": encrypted}
    if isinstance(item.get("id"), str) and item["id"]:
        kept["id"] = item["id"]
    # Only the summary's text parts: the state comes back from the client and is checked, not trusted.
    parts = summary if isinstance(summary, list) else []
    kept["summary"] = [
        {"type": "summary_text", "text": p["text"]}
        for p in parts
        if isinstance(p, dict) and p.get("type") == "summary_text" and isinstance(p.get("text"), str)
    ]
    return kept


class _Calls:
    """Function calls numbered 0, 1, ... in order of appearance, whatever `output_index` (which counts every output
    item: reasoning and messages too) the server gives them."""

    def __init__(self) -> None:
        self._by_output: dict[int, int] = {}  # output_index -> our index
        self._by_item: dict[str, int] = {}  # item id -> our index
        self._sent: dict[int, bool] = {}  # our index -> whether any arguments were sent
        self.count = 0

    def _index(self, data: Mapping[str, Any]) -> int | None:
        item_id = data.get("item_id")
        if isinstance(item_id, str) and item_id in self._by_item:
            return self._by_item[item_id]
        position = _int_or_none(data.get("output_index"))
        return self._by_output.get(position) if position is not None else None

    def added(self, data: Mapping[str, Any], item: Mapping[str, Any]) -> list[StreamItem]:
        index, self.count = self.count, self.count + 1
        position = _int_or_none(data.get("output_index"))
        if position is not None:
            self._by_output[position] = index
        if isinstance(item.get("id"), str):
            self._by_item[item["id"]] = index
        self._sent[index] = False
        # The arguments follow as deltas; a server that sends them with the item instead is read at its `done`.
        return [ToolCallDelta(index, "", _str_or_none(item.get("call_id")), _str_or_none(item.get("name")))]

    def delta(self, data: Mapping[str, Any]) -> list[StreamItem]:
        index = self._index(data)
        fragment = data.get("delta")
        if index is None or not isinstance(fragment, str) or not fragment:
            return []
        self._sent[index] = True
        return [ToolCallDelta(index, fragment)]

    def done(self, data: Mapping[str, Any], item: Mapping[str, Any]) -> list[StreamItem]:
        index = self._index(data)
        items: list[StreamItem] = []
        if index is None:  # a call never announced comes whole here
            items, index = self.added(data, item), self.count - 1
        arguments = item.get("arguments")
        if not self._sent[index] and isinstance(arguments, str) and arguments:
            items.append(ToolCallDelta(index, arguments))
        self._sent[index] = True
        return [*items, ToolCallEnd(index)]


class _Decoder:
    def __init__(self, api_key: str | None) -> None:
        self._api_key = api_key
        self._calls = _Calls()
        self._reasoning: list[dict[str, Any]] = []  # finished reasoning items, for provider_state
        self._reasoning_part: tuple[object, object] | None = None  # (item, part) of the last reasoning text

    def feed(self, event: SSEEvent) -> list[StreamItem]:
        data = event.data.strip()
        if not data or data == "[DONE]":  # some compatible servers end with [DONE] as Chat Completions does
            return []
        obj = load_object(data)
        kind = obj.get("type") if isinstance(obj.get("type"), str) else event.event
        handler = _HANDLERS.get(str(kind))
        return handler(self, obj) if handler is not None else []

    def end(self, cut: ProviderError | None) -> Finish:
        raise cut or truncated("the stream ended before response.completed")

    def _text(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        delta = obj.get("delta")
        return [TextDelta(delta)] if isinstance(delta, str) and delta else []

    def _refusal(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        delta = obj.get("delta")
        return [RefusalDelta(delta)] if isinstance(delta, str) and delta else []

    def _summary(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        return self._reasoning_delta(obj, obj.get("summary_index"))

    def _reasoning_text(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        return self._reasoning_delta(obj, obj.get("content_index"))

    def _reasoning_delta(self, obj: Mapping[str, Any], part: object) -> list[StreamItem]:
        delta = obj.get("delta")
        if not isinstance(delta, str) or not delta:
            return []
        at = (obj.get("item_id"), part)
        # A summary comes in parts, each a paragraph of its own: without a break they would run together.
        items: list[StreamItem] = [ReasoningDelta("\n\n")] if self._reasoning_part not in (None, at) else []
        self._reasoning_part = at
        return [*items, ReasoningDelta(delta)]

    def _item_added(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        item = obj.get("item")
        if isinstance(item, dict) and item.get("type") == "function_call":
            return self._calls.added(obj, item)
        return []

    def _arguments(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        return self._calls.delta(obj)

    def _item_done(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        item = obj.get("item")
        if not isinstance(item, dict):
            return []
        if item.get("type") == "function_call":
            return self._calls.done(obj, item)
        if item.get("type") == "reasoning" and (kept := _kept_reasoning(item)) is not None:
            self._reasoning.append(kept)
        return []

    def _completed(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        return [self._finish(obj, "tool_calls" if self._calls.count else "stop")]

    def _incomplete(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        response = obj.get("response")
        details = response.get("incomplete_details") if isinstance(response, dict) else None
        reason = details.get("reason") if isinstance(details, dict) else None
        if not isinstance(reason, str) or not reason:
            return [self._finish(obj, "length")]  # the one reason a plain answer stops short
        return [self._finish(obj, _INCOMPLETE.get(reason, reason.lower()))]

    def _failed(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        response = obj.get("response")
        error = response.get("error") if isinstance(response, dict) else None
        raise self._error(error if isinstance(error, dict) else {"message": "the response failed"})

    def _error_event(self, obj: Mapping[str, Any]) -> list[StreamItem]:
        # The documented event carries code and message itself; some servers nest an error object instead.
        nested = obj.get("error")
        raise self._error(nested if isinstance(nested, dict) else obj)

    def _finish(self, obj: Mapping[str, Any], reason: str) -> Finish:
        response = obj.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        return Finish(
            reason,
            _int_or_none(usage.get("input_tokens")),
            _int_or_none(usage.get("output_tokens")),
            reasoning_tokens=_details(usage, "output_tokens_details", "reasoning_tokens"),
            cached_input_tokens=_details(usage, "input_tokens_details", "cached_tokens"),
            provider_state={"reasoning": self._reasoning} if self._reasoning else None,
        )

    def _error(self, err: Mapping[str, Any]) -> ProviderError:
        # `code` names the error; `type` (of a nested error object) may be the only name, or the better-known one.
        kinds = [k for k in (err.get("code"), err.get("type")) if isinstance(k, str) and k and k != "error"]
        message = clean_message(str(err.get("message") or "error in stream"), self._api_key)
        known = next((_STREAM_ERRORS[k] for k in kinds if k in _STREAM_ERRORS), None)
        if known is not None:
            return ProviderError(known[0], message, retryable=known[1])
        return ProviderError("provider_error", f"{kinds[0]}: {message}" if kinds else message)


_HANDLERS = {
    "response.output_text.delta": _Decoder._text,
    "response.refusal.delta": _Decoder._refusal,
    "response.reasoning_summary_text.delta": _Decoder._summary,
    "response.reasoning_text.delta": _Decoder._reasoning_text,
    "response.output_item.added": _Decoder._item_added,
    "response.function_call_arguments.delta": _Decoder._arguments,
    "response.output_item.done": _Decoder._item_done,
    "response.completed": _Decoder._completed,
    "response.incomplete": _Decoder._incomplete,
    "response.failed": _Decoder._failed,
    "error": _Decoder._error_event,
}


def _filename(data_url: str) -> str:
    # The API wants a name with inline file data; the extension tells it the type.
    mime = data_url_mime(data_url) or ""
    return "file" + (mimetypes.guess_extension(mime) or "")


def _part(part: Mapping[str, Any]) -> dict[str, Any]:
    if part["type"] == "text":
        return {"type": "input_text", "text": part["text"]}
    if part["type"] == "image_url":
        image = part["image_url"]
        return {"type": "input_image", "image_url": image["url"], "detail": image.get("detail", "auto")}
    file = part["file"]
    return {
        "type": "input_file",
        "file_data": file["file_data"],
        "filename": file.get("filename") or _filename(file["file_data"]),
    }


def _assistant(m: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The reasoning items kept from this answer, its text (and refusal) as an output message, then its calls: the
    order in which the model produced them."""
    state = assistant_state(m, KIND).get("reasoning")
    kept = (_kept_reasoning(r) for r in state if isinstance(r, dict)) if isinstance(state, list) else ()
    items = [r for r in kept if r is not None]
    content: list[dict[str, Any]] = []
    if text := content_text(m.get("content")):
        content.append({"type": "output_text", "text": text})
    if m.get("refusal"):
        content.append({"type": "refusal", "refusal": m["refusal"]})
    if content:
        items.append({"role": "assistant", "content": content})
    for call in m.get("tool_calls") or ():
        function = call["function"]
        items.append(
            {
                "type": "function_call",
                "call_id": call["id"],
                "name": function["name"],
                "arguments": function["arguments"],
            }
        )
    return items


def _input(m: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One chat message as input items. System and developer messages stay in place with their own role (both are
    input roles) rather than moving to `instructions`: a developer message in mid-conversation keeps its position,
    and several of them need no merging."""
    role, content = m["role"], m.get("content")
    if role == "assistant":
        return _assistant(m)
    if role == "tool":
        return [{"type": "function_call_output", "call_id": m["tool_call_id"], "output": content_text(content)}]
    if role == "user" and isinstance(content, list):
        return [{"role": "user", "content": [_part(p) for p in content]}]
    return [{"role": role, "content": content_text(content)}]


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    out: dict[str, Any] = {
        "type": "function",
        "name": function["name"],
        "parameters": function.get("parameters") or {"type": "object", "properties": {}},
        # The Responses API makes a function strict unless told otherwise (which rewrites optional fields into
        # required ones); a chat request that does not say means Chat Completions' default, not strict.
        "strict": function.get("strict", False),
    }
    if "description" in function:
        out["description"] = function["description"]
    return out


def _tool_choice(choice: str | Mapping[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, Mapping):
        return {"type": "function", "name": choice["function"]["name"]}
    return choice


def _text_format(response_format: Mapping[str, Any]) -> dict[str, Any]:
    if response_format["type"] != "json_schema":
        return {"type": "json_object"}
    spec = response_format["json_schema"]
    extra = {k: spec[k] for k in ("description", "strict") if k in spec}
    return {"type": "json_schema", "name": spec["name"], "schema": spec["schema"], **extra}


def _input_items(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [item for m in messages for item in _input(m)]


class OpenAIResponsesProvider(OpenAIProvider):
    """`POST {base_url}/responses` with `stream: true`; see the module docstring. Same key, base URL, headers and
    error bodies as the Chat Completions provider it extends."""

    name = KIND
    kind = KIND
    path = "/responses"

    def _decoder(self) -> StreamDecoder:
        return _Decoder(self._config.api_key)

    @staticmethod
    def _body(request: GenerationRequest) -> dict[str, Any]:
        items = _input_items(request.messages)
        body: dict[str, Any] = {"model": request.model, "input": items, "stream": True, "store": False}
        reasoning = {"effort": request.reasoning_effort, "summary": "auto"} if request.reasoning_effort else None
        # Encrypted reasoning is what lets the next turn continue this one's reasoning without a stored response;
        # asked for only where reasoning is in play, since models that do not reason refuse the request with it.
        carries = any(item.get("type") == "reasoning" for item in items)
        params = {
            "max_output_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "tools": [_tool(t) for t in request.tools] if request.tools else None,
            "tool_choice": _tool_choice(request.tool_choice),
            "parallel_tool_calls": request.parallel_tool_calls if request.tools else None,
            "text": {"format": _text_format(request.response_format)} if request.response_format else None,
            "reasoning": reasoning,
            "include": ["reasoning.encrypted_content"] if reasoning or carries else None,
        }
        body.update({k: v for k, v in params.items() if v is not None})
        return body
