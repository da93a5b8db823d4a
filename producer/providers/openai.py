"""OpenAI Chat Completions streaming, and every server that speaks it (vLLM, Ollama, llama.cpp, Groq, OpenRouter).

Wire format: unnamed `data:` events holding `chat.completion.chunk` objects, a chunk with `finish_reason`, with
`stream_options.include_usage` one more chunk with `choices: []` and `usage`, then `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

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
    RefusalDelta,
    StreamItem,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
)
from ssecore.chat import data_url_mime
from ssecore.sse import SSEEvent

__all__ = ["DEFAULT_BASE_URL", "AzureOpenAIProvider", "OpenAIProvider"]

# Like the official SDK, the base URL includes the version path; compatible servers are configured the same way
# (e.g. "http://localhost:8000/v1" for vLLM, "http://localhost:11434/v1" for Ollama).
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the deprecated functions API
}
# Error codes meaning money, not rate: retrying cannot help until someone pays.
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})
# In-stream error types after which a new attempt may succeed.
_RETRYABLE_STREAM_ERRORS = {
    "server_error": "server_error",
    "overloaded": "overloaded",
    "overloaded_error": "overloaded",
}


def _quota(err: Mapping[str, Any]) -> bool:
    # A code may be anything a server sends (a list, an object): only a string can name a quota.
    return any(isinstance(err.get(k), str) and err[k] in _QUOTA_CODES for k in ("code", "type"))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _delta_items(delta: Mapping[str, Any]) -> list[StreamItem]:
    """What one chunk's delta adds: reasoning (`reasoning_content` as DeepSeek and vLLM send it, `reasoning` as
    OpenRouter does), a refusal, then text. Empty strings are no delta: the first chunk has `"content": ""`."""
    items: list[StreamItem] = []
    for key in ("reasoning_content", "reasoning"):
        reasoning = delta.get(key)
        if isinstance(reasoning, str) and reasoning:
            items.append(ReasoningDelta(reasoning))
    refusal = delta.get("refusal")
    if isinstance(refusal, str) and refusal:
        items.append(RefusalDelta(refusal))
    content = delta.get("content")
    if isinstance(content, str) and content:
        items.append(TextDelta(content))
    return items


def _details(usage: Mapping[str, Any], key: str, field: str) -> int | None:
    details = usage.get(key)
    return _int_or_none(details.get(field)) if isinstance(details, dict) else None


class _Calls:
    """Tool-call fragments, numbered 0, 1, ... in order of appearance. A call is known by the server's `index`; a
    server that numbers every call 0 still starts a new one with each new `id`."""

    def __init__(self) -> None:
        self._by_index: dict[int, tuple[int, str | None]] = {}  # server index -> (our index, id)
        self._count = 0
        self._open: list[int] = []

    def items(self, fragments: object) -> list[StreamItem]:
        items: list[StreamItem] = []
        for fragment in fragments if isinstance(fragments, list) else ():
            if not isinstance(fragment, dict):
                continue
            function = fragment.get("function")
            function = function if isinstance(function, dict) else {}
            call_id = _text(fragment.get("id"))
            name = _text(function.get("name"))
            arguments = _arguments(function.get("arguments"))
            key = fragment.get("index")
            key = key if isinstance(key, int) and not isinstance(key, bool) else 0
            known = self._by_index.get(key)
            if known is not None and (call_id is None or known[1] in (None, call_id)):
                items.append(ToolCallDelta(known[0], arguments, None, name))
                continue
            # A new call: those before it are complete (a server streams calls one after another).
            items.extend(self.end())
            index, self._count = self._count, self._count + 1
            self._open = [index]
            self._by_index[key] = (index, call_id)
            items.append(ToolCallDelta(index, arguments, call_id, name))
        return items

    def end(self) -> list[StreamItem]:
        ended: list[StreamItem] = [ToolCallEnd(i) for i in self._open]
        self._open = []
        return ended


def _arguments(value: object) -> str:
    # Some compatible servers send the arguments as a JSON object rather than as its text.
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value if isinstance(value, str) else ""


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


class _Decoder:
    def __init__(self, api_key: str | None) -> None:
        self._api_key = api_key
        self._finish_reason: str | None = None
        self._input_tokens: int | None = None
        self._output_tokens: int | None = None
        self._reasoning_tokens: int | None = None
        self._cached_tokens: int | None = None
        self._calls = _Calls()

    def feed(self, event: SSEEvent) -> list[StreamItem]:
        data = event.data.strip()
        if data == "[DONE]":
            return [self._finish()]
        if not data:
            return []
        chunk = load_object(data)
        # OpenAI puts an error under "error"; vLLM and other compatible servers send the error object itself, as a
        # chunk whose "object" is "error". Either way the answer failed: never a `done`.
        if chunk.get("error"):
            raise self._stream_error(chunk)
        if chunk.get("object") == "error":
            raise self._stream_error({"error": chunk})
        self._take_usage(chunk.get("usage"))
        # Groq reports usage under its own key.
        x_groq = chunk.get("x_groq")
        if isinstance(x_groq, dict):
            self._take_usage(x_groq.get("usage"))
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []  # the usage-only chunk, or a server's extra chunk
        choice = choices[0]
        delta = choice.get("delta")
        items = _delta_items(delta) if isinstance(delta, dict) else []
        if isinstance(delta, dict) and delta.get("tool_calls"):
            items.extend(self._calls.items(delta["tool_calls"]))
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            if reason.lower() == "error":
                # vLLM and some gateways end a failed generation this way, after whatever text came: it is not whole.
                raise ProviderError("provider_error", "the provider ended the answer with finish_reason error")
            self._finish_reason = _FINISH_REASONS.get(reason, reason.lower())
            items.extend(self._calls.end())
        return items

    def end(self, cut: ProviderError | None) -> Finish:
        # Without [DONE], a finish_reason still means the text is complete; only the usage chunk may be missing.
        if self._finish_reason is not None:
            return self._finish()
        raise cut or truncated("the stream ended before [DONE] and before any finish_reason")

    def _finish(self) -> Finish:
        # A server that sends [DONE] without any finish_reason has nonetheless said it is done.
        return Finish(
            self._finish_reason or "stop",
            self._input_tokens,
            self._output_tokens,
            reasoning_tokens=self._reasoning_tokens,
            cached_input_tokens=self._cached_tokens,
        )

    def _take_usage(self, usage: object) -> None:
        # Some servers (vLLM with continuous usage stats) repeat usage in every chunk: the last one wins.
        if isinstance(usage, dict):
            self._input_tokens = _int_or_none(usage.get("prompt_tokens"))
            self._output_tokens = _int_or_none(usage.get("completion_tokens"))
            self._reasoning_tokens = _details(usage, "completion_tokens_details", "reasoning_tokens")
            self._cached_tokens = _details(usage, "prompt_tokens_details", "cached_tokens")

    def _stream_error(self, chunk: Mapping[str, Any]) -> ProviderError:
        err = error_object(chunk)
        kind = str(err.get("type") or err.get("code") or "")
        message = clean_message(str(err.get("message") or "error in stream"), self._api_key)
        if kind in _QUOTA_CODES or _quota(err):
            return ProviderError("quota_exhausted", message)
        if kind in _RETRYABLE_STREAM_ERRORS:
            return ProviderError(_RETRYABLE_STREAM_ERRORS[kind], message, retryable=True)
        return ProviderError("provider_error", f"{kind}: {message}" if kind else message)


# What a message may carry to the API: the rest (`reasoning`, `provider_state`) is ours, and servers refuse it.
_MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal")


def _message(m: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: m[k] for k in _MESSAGE_FIELDS if m.get(k) is not None or (k == "content" and "content" in m)}
    if out["role"] == "developer":
        # The API reads a system message as a developer message for the models that have them; compatible servers
        # (vLLM, Ollama, Mistral) know only `system`.
        out["role"] = "system"
    if isinstance(out.get("content"), list):
        out["content"] = [_part(p) for p in out["content"]]
    if "tool_calls" in out:
        out["tool_calls"] = [{**c, "type": "function"} for c in out["tool_calls"]]
    return out


def _part(part: Mapping[str, Any]) -> Mapping[str, Any]:
    # The API wants a file's name with its data; the request may leave it out.
    file = part.get("file")
    if part.get("type") == "file" and isinstance(file, dict) and not file.get("filename"):
        mime = data_url_mime(file["file_data"]) or "application/octet-stream"
        return {"type": "file", "file": {**file, "filename": "file." + mime.rpartition("/")[2]}}
    return part


class OpenAIProvider(SSEProvider):
    """`POST {base_url}/chat/completions` with `stream: true`; see the module docstring for the wire format."""

    name = "openai"
    kind = "openai"
    default_base_url = DEFAULT_BASE_URL
    path = "/chat/completions"
    decoder = _Decoder

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._config.api_key:
            # Local servers (Ollama, llama.cpp) need no key.
            headers["Authorization"] = f"Bearer {self._config.api_key}"
        return headers

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": request.model, "messages": [_message(m) for m in request.messages]}
        body["stream"] = True
        if self._config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        params = {
            # By default the name every current model takes (reasoning models refuse the older `max_tokens`).
            self._config.max_tokens_param: request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": list(request.stop) if request.stop is not None else None,
            "tools": list(request.tools) if request.tools else None,
            "tool_choice": request.tool_choice if request.tools else None,  # refused without tools
            "parallel_tool_calls": request.parallel_tool_calls if request.tools else None,
            "response_format": request.response_format,
            "reasoning_effort": request.reasoning_effort,
        }
        body.update({k: v for k, v in params.items() if v is not None})
        return body

    def _classify(self, status: int, body: object, headers: Mapping[str, str]) -> ProviderError:
        err = error_object(body)
        message = clean_message(str(err.get("message") or ""), self._config.api_key)
        if _quota(err):
            return status_error(status, message, headers, code="quota_exhausted", retryable=False)
        return status_error(status, message, headers)


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI: the same stream, at `{resource root}/openai/deployments/{model}/chat/completions` with the entry's
    `query` (its `api-version`), the key in an `api-key` header; `model` names the deployment."""

    name = "azure-openai"
    kind = "azure-openai"
    default_base_url = ""  # a providers-file entry always has one

    def _url(self, request: GenerationRequest) -> str:
        return f"{self._root}/openai/deployments/{quote(request.model, safe='')}/chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._config.api_key:
            headers["api-key"] = self._config.api_key
        return headers
