"""Anthropic Messages streaming (`POST {base_url}/v1/messages`).

Wire format: named events `message_start` (input usage), `content_block_start` / `content_block_delta` /
`content_block_stop`, `message_delta` (stop reason; cumulative output usage), `message_stop`, any number of `ping`s,
and `error` events that can arrive after HTTP 200. Event types not listed here are ignored, as the API asks.

Content blocks, numbered in one sequence: `thinking` (thinking_delta, then one signature_delta) or
`redacted_thinking` (whole at its start), `text` (text_delta), `tool_use` (id and name at its start, then the
arguments as input_json_delta fragments). The thinking blocks go back, whole and signed, in the assistant message of
the next turn: they are the answer's provider_state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import orjson

from producer.providers._http import (
    SSEProvider,
    clean_message,
    error_object,
    load_object,
    status_error,
    truncated,
)
from producer.providers.base import (
    Finish,
    GenerationRequest,
    ProviderError,
    ReasoningDelta,
    StreamItem,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
)
from ssecore.capabilities import ANTHROPIC_THINKING_BUDGETS
from ssecore.chat import assistant_state, content_text, data_url_mime
from ssecore.sse import SSEEvent

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_BASE_URL", "DEFAULT_MAX_TOKENS", "AnthropicProvider"]

DEFAULT_BASE_URL = "https://api.anthropic.com"  # the server root: the path carries the version
ANTHROPIC_VERSION = "2023-06-01"
# The API requires max_tokens; this is what a request that leaves it to "the provider's default" gets (on top of
# the thinking budget when it thinks: see ssecore.capabilities.ANTHROPIC_THINKING_BUDGETS).
DEFAULT_MAX_TOKENS = 1024

_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# error.type -> (code, retryable), for `error` events and as a refinement of HTTP statuses.
_ERROR_TYPES: dict[str, tuple[str, bool]] = {
    "overloaded_error": ("overloaded", True),
    "api_error": ("server_error", True),
    "rate_limit_error": ("rate_limited", True),
    "timeout_error": ("timeout", True),
    "authentication_error": ("auth", False),
    "permission_error": ("auth", False),
    "billing_error": ("quota_exhausted", False),
    "invalid_request_error": ("bad_request", False),
    "not_found_error": ("bad_request", False),
    "request_too_large": ("bad_request", False),
}
# A spend limit or an empty credit balance comes back as a 400 or a 429 that looks like any other; only the
# words (or, lately, error.details.error_code) tell. Retrying would hammer the API until someone pays.
_QUOTA_PHRASES = ("credit balance", "spend limit", "usage limit", "billing", "purchase credits")


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_quota(err: Mapping[str, Any]) -> bool:
    if err.get("type") == "billing_error":
        return True
    details = err.get("details")
    if isinstance(details, dict) and "spend_limit" in str(details.get("error_code") or ""):
        return True
    message = str(err.get("message") or "").lower()
    return any(phrase in message for phrase in _QUOTA_PHRASES)


class _Decoder:
    def __init__(self, api_key: str | None) -> None:
        self._api_key = api_key
        self._stop_reason: str | None = None
        self._input_tokens: int | None = None
        self._output_tokens: int | None = None
        self._cached_tokens: int | None = None
        # The API numbers every content block (thinking, text, tool_use); calls are numbered apart, 0, 1, ...
        self._calls: dict[int, int] = {}  # block index -> call index
        self._thinking: list[dict[str, Any]] = []  # the thinking blocks, whole, in order: the answer's state
        self._open_thinking: dict[int, dict[str, Any]] = {}  # block index -> its entry in _thinking
        self._handlers: dict[str, Callable[[dict[str, Any]], list[StreamItem]]] = {
            "content_block_start": self._block_start,
            "content_block_delta": self._block_delta,
            "content_block_stop": self._block_stop,
            "message_start": self._message_start,
            "message_delta": self._message_delta,
            "message_stop": lambda _data: [self._finish()],
            "error": self._stream_error,
        }

    def feed(self, event: SSEEvent) -> list[StreamItem]:
        kind = event.event
        data: dict[str, Any] | None = None
        if kind == "message":
            # An unnamed event (a proxy that drops `event:` lines): the payload's `type` says the same.
            data = load_object(event.data)
            kind = str(data.get("type") or "")
        handler = self._handlers.get(kind)
        # ping and future event types: nothing to say (their data need not even be read).
        if handler is None:
            return []
        return handler(data if data is not None else load_object(event.data))

    def end(self, cut: ProviderError | None) -> Finish:
        # message_delta carries the stop reason: past it, only message_stop is missing and the text is complete.
        if self._stop_reason is not None:
            return self._finish()
        raise cut or truncated("the stream ended before message_stop")

    def _finish(self) -> Finish:
        state = {"thinking": [dict(block) for block in self._thinking]} if self._thinking else None
        return Finish(
            self._stop_reason or "stop",
            self._input_tokens,
            self._output_tokens,
            cached_input_tokens=self._cached_tokens,
            provider_state=state,
        )

    def _block_start(self, data: dict[str, Any]) -> list[StreamItem]:
        block, index = data.get("content_block"), data.get("index")
        if not isinstance(block, dict) or not _is_int(index):
            return []
        kind = block.get("type")
        if kind == "tool_use":
            call = self._calls[index] = len(self._calls)
            # The API starts every call with `input: {}` and streams the arguments; a gateway may give them whole.
            whole = block.get("input")
            arguments = orjson.dumps(whole).decode() if isinstance(whole, dict) and whole else ""
            return [ToolCallDelta(call, arguments, _text(block.get("id")), _text(block.get("name")))]
        if kind == "thinking":
            # The API starts it empty and streams the text; what a start may carry is the text's beginning.
            first = _text(block.get("thinking"))
            entry = {"type": "thinking", "thinking": first or "", "signature": _text(block.get("signature")) or ""}
            self._open_thinking[index] = entry
            self._thinking.append(entry)
            return [ReasoningDelta(first)] if first else []
        if kind == "redacted_thinking":
            # Encrypted: nothing to show, but the API wants it back, as it came, to continue the turn.
            self._thinking.append({"type": "redacted_thinking", "data": block.get("data")})
        return []

    def _block_delta(self, data: dict[str, Any]) -> list[StreamItem]:
        delta, index = data.get("delta"), data.get("index")
        if not isinstance(delta, dict):
            return []
        kind = delta.get("type")
        if kind == "text_delta" and (text := _text(delta.get("text"))):
            return [TextDelta(text)]
        if kind == "input_json_delta" and _is_int(index) and index in self._calls:
            json = _text(delta.get("partial_json"))  # the first fragment is often ""
            return [ToolCallDelta(self._calls[index], json)] if json else []
        entry = self._open_thinking.get(index) if _is_int(index) else None
        if kind == "thinking_delta" and (thinking := _text(delta.get("thinking"))):
            if entry is not None:
                entry["thinking"] += thinking
            return [ReasoningDelta(thinking)]
        if kind == "signature_delta" and entry is not None:
            entry["signature"] += _text(delta.get("signature")) or ""
        # citations and future delta types: nothing to say.
        return []

    def _block_stop(self, data: dict[str, Any]) -> list[StreamItem]:
        index = data.get("index")
        if _is_int(index) and index in self._calls:
            return [ToolCallEnd(self._calls[index])]
        return []

    def _message_start(self, data: dict[str, Any]) -> list[StreamItem]:
        message = data.get("message")
        if isinstance(message, dict):
            self._take_usage(message.get("usage"))
        return []

    def _message_delta(self, data: dict[str, Any]) -> list[StreamItem]:
        delta = data.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
            reason: str = delta["stop_reason"]
            self._stop_reason = _STOP_REASONS.get(reason, reason.lower())
        self._take_usage(data.get("usage"))
        return []

    def _take_usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        # Cached prompt tokens are reported apart from input_tokens; the prompt's size is their sum.
        if "input_tokens" in usage:
            self._input_tokens = (
                _int(usage.get("input_tokens"))
                + _int(usage.get("cache_creation_input_tokens"))
                + _int(usage.get("cache_read_input_tokens"))
            )
        if "cache_read_input_tokens" in usage:
            self._cached_tokens = _int(usage.get("cache_read_input_tokens"))
        # output_tokens is cumulative (message_start already has a first count): the latest value is the total.
        if isinstance(usage.get("output_tokens"), int):
            self._output_tokens = usage["output_tokens"]

    def _stream_error(self, data: dict[str, Any]) -> list[StreamItem]:
        """Raises: an error after HTTP 200 ends the answer, whatever came before."""
        err = error_object(data)
        kind = str(err.get("type") or "")
        message = clean_message(str(err.get("message") or "error in stream"), self._api_key)
        if _is_quota(err):
            raise ProviderError("quota_exhausted", message)
        code, retryable = _ERROR_TYPES.get(kind, ("provider_error", False))
        raise ProviderError(code, f"{kind}: {message}" if kind else message, retryable=retryable)


# --- the request, from the job's (OpenAI) vocabulary ------------------------------------------------------------------

_SYSTEM_ROLES = frozenset({"system", "developer"})


def _source(url: str) -> dict[str, Any]:
    """An image's or a document's `source`: inline base64 for a data: URL, else the link itself."""
    mime = data_url_mime(url)
    if mime is None:
        return {"type": "url", "url": url}
    return {"type": "base64", "media_type": mime, "data": url.partition(",")[2]}


def _part(part: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = part["type"]
    if kind == "text":
        # The API refuses empty text blocks.
        return {"type": "text", "text": part["text"]} if part["text"] else None
    if kind == "image_url":
        return {"type": "image", "source": _source(part["image_url"]["url"])}
    file = part["file"]  # a PDF: the hub refuses any other file for this kind
    document: dict[str, Any] = {"type": "document", "source": _source(file["file_data"])}
    if file.get("filename"):
        document["title"] = file["filename"]
    return document


def _user_blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    parts = content if isinstance(content, list) else []
    return [block for part in parts if (block := _part(part)) is not None]


def _arguments(raw: str, where: str) -> dict[str, Any]:
    """A call's arguments as the `input` object the API wants; arguments that are no JSON object are refused, as a
    call the model never made would otherwise be sent back in its name."""
    if not raw.strip():
        return {}  # a call without arguments ("{}" is what done.message itself gives)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProviderError("bad_request", f"{where} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ProviderError("bad_request", f"{where} is not a JSON object")
    return value


def _thinking_block(block: Any) -> dict[str, Any] | None:
    """A thinking block from provider_state as the API takes it, its fields and no others; None if it is not one. The
    state comes back from the client: what it holds is checked, not trusted."""
    if not isinstance(block, dict):
        return None
    fields = {"thinking": ("thinking", "signature"), "redacted_thinking": ("data",)}.get(str(block.get("type")))
    if fields is None or not all(isinstance(block.get(f), str) for f in fields):
        return None
    return {"type": block["type"], **{f: block[f] for f in fields}}


def _assistant_blocks(message: Mapping[str, Any], i: int) -> list[dict[str, Any]]:
    """Thinking first (as the answer gave it, signatures and all: the API checks them), then text, then calls."""
    thinking = assistant_state(message, "anthropic").get("thinking")
    blocks = [b for b in map(_thinking_block, thinking if isinstance(thinking, list) else ()) if b is not None]
    text = content_text(message.get("content")) or message.get("refusal") or ""
    if text:
        blocks.append({"type": "text", "text": text})
    for k, call in enumerate(message.get("tool_calls") or ()):
        function = call["function"]
        where = f"messages[{i}].tool_calls[{k}].function.arguments"
        input_ = _arguments(function["arguments"], where)
        blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"], "input": input_})
    return blocks


def _blocks(message: Mapping[str, Any], i: int) -> list[dict[str, Any]]:
    role = message["role"]
    if role == "assistant":
        return _assistant_blocks(message, i)
    if role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
        if text := content_text(message.get("content")):
            result["content"] = text
        return [result]
    return _user_blocks(message.get("content"))


def _messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as the API takes it: user and assistant turns alternating, tool results as user turns.
    Consecutive messages of one role (several tool results, say) become one message."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message["role"] in _SYSTEM_ROLES or not (blocks := _blocks(message, i)):
            continue
        role = "assistant" if message["role"] == "assistant" else "user"
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for m in out:
        m["content"] = _plain(m["content"])
    return out


def _plain(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One plain text block goes as the string it was."""
    if len(blocks) == 1 and blocks[0].get("type") == "text" and blocks[0].keys() == {"type", "text"}:
        text: str = blocks[0]["text"]
        return text
    return blocks


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    # The API requires a schema of "type": "object"; OpenAI lets both be left out.
    schema = dict(function.get("parameters") or {"properties": {}})
    schema.setdefault("type", "object")
    out: dict[str, Any] = {"name": function["name"], "input_schema": schema}
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("strict") is not None:
        out["strict"] = function["strict"]
    return out


def _tool_choice(request: GenerationRequest) -> dict[str, Any] | None:
    if not request.tools:
        return None
    choice = request.tool_choice
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, Mapping):
        out: dict[str, Any] = {"type": "tool", "name": choice["function"]["name"]}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "auto" or request.parallel_tool_calls is False:
        out = {"type": "auto"}  # only parallel_tool_calls false needs a tool_choice when none is asked for
    else:
        return None
    if request.parallel_tool_calls is False:
        out["disable_parallel_tool_use"] = True
    return out


def _output_config(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    # Only a schema: the hub refuses json_object for this kind.
    if response_format is None or response_format["type"] != "json_schema":
        return None
    return {"format": {"type": "json_schema", "schema": response_format["json_schema"]["schema"]}}


def _thinking(effort: str | None) -> dict[str, Any] | None:
    return None if effort is None else {"type": "enabled", "budget_tokens": ANTHROPIC_THINKING_BUDGETS[effort]}


def _max_tokens(request: GenerationRequest, default: int) -> int:
    if request.max_tokens is not None:
        return request.max_tokens  # above any thinking budget: the hub refuses less
    # The thinking counts toward max_tokens: the default answer comes on top of its budget.
    budget = ANTHROPIC_THINKING_BUDGETS[request.reasoning_effort] if request.reasoning_effort is not None else 0
    return budget + default


class AnthropicProvider(SSEProvider):
    """`POST {base_url}/v1/messages` with `stream: true`; see the module docstring for the wire format."""

    name = "anthropic"
    kind = "anthropic"
    default_base_url = DEFAULT_BASE_URL
    path = "/v1/messages"
    decoder = _Decoder

    def _headers(self) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "anthropic-version": ANTHROPIC_VERSION,
        }
        if self._config.api_key:
            headers["x-api-key"] = self._config.api_key
        return headers

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        # The API has no system role: system and developer text is one top-level string.
        system = [content_text(m.get("content")) for m in request.messages if m["role"] in _SYSTEM_ROLES]
        body: dict[str, Any] = {
            "model": request.model,
            "messages": _messages(request.messages),
            "max_tokens": _max_tokens(request, self._config.default_max_tokens or DEFAULT_MAX_TOKENS),
            "stream": True,
        }
        if system:
            body["system"] = "\n\n".join(system)
        params = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop_sequences": list(request.stop) if request.stop is not None else None,
            "tools": [_tool(t) for t in request.tools] if request.tools else None,
            "tool_choice": _tool_choice(request),
            "output_config": _output_config(request.response_format),
            "thinking": _thinking(request.reasoning_effort),
        }
        body.update({k: v for k, v in params.items() if v is not None})
        return body

    def _classify(self, status: int, body: object, headers: Mapping[str, str]) -> ProviderError:
        err = error_object(body)
        message = clean_message(str(err.get("message") or ""), self._config.api_key)
        if _is_quota(err):
            return status_error(status, message, headers, code="quota_exhausted", retryable=False)
        if status == 529 or err.get("type") == "overloaded_error":
            return status_error(status, message, headers, code="overloaded", retryable=True)
        return status_error(status, message, headers)
