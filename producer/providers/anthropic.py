"""Anthropic Messages streaming (`POST {base_url}/v1/messages`).

Wire format: named events `message_start` (input usage), `content_block_start` / `content_block_delta` /
`content_block_stop`, `message_delta` (stop reason; cumulative output usage), `message_stop`, any number of `ping`s,
and `error` events that can arrive after HTTP 200. Event types not listed here are ignored, as the API asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
)
from ssecore.chat import content_text
from ssecore.sse import SSEEvent

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_BASE_URL", "DEFAULT_MAX_TOKENS", "AnthropicProvider"]

DEFAULT_BASE_URL = "https://api.anthropic.com"  # the server root: the path carries the version
ANTHROPIC_VERSION = "2023-06-01"
# The API requires max_tokens; this is what a request that leaves it to "the provider's default" gets.
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

    def feed(self, event: SSEEvent) -> list[StreamItem]:
        kind = event.event
        if kind == "message":
            # An unnamed event (a proxy that drops `event:` lines): the payload's `type` says the same.
            kind = str(load_object(event.data).get("type") or "")
        if kind == "content_block_delta":
            delta = load_object(event.data).get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if isinstance(text, str) and text:
                    return [TextDelta(text)]
            elif isinstance(delta, dict) and delta.get("type") == "thinking_delta":
                thinking = delta.get("thinking")
                if isinstance(thinking, str) and thinking:
                    return [ReasoningDelta(thinking)]
        elif kind == "message_start":
            message = load_object(event.data).get("message")
            if isinstance(message, dict):
                self._take_usage(message.get("usage"))
        elif kind == "message_delta":
            self._message_delta(load_object(event.data))
        elif kind == "message_stop":
            return [self._finish()]
        elif kind == "error":
            raise self._stream_error(load_object(event.data))
        # ping, content_block_start/stop, signature and tool-input deltas, and future event types: nothing to say.
        return []

    def end(self, cut: ProviderError | None) -> Finish:
        # message_delta carries the stop reason: past it, only message_stop is missing and the text is complete.
        if self._stop_reason is not None:
            return self._finish()
        raise cut or truncated("the stream ended before message_stop")

    def _finish(self) -> Finish:
        return Finish(self._stop_reason or "stop", self._input_tokens, self._output_tokens)

    def _message_delta(self, data: Mapping[str, Any]) -> None:
        delta = data.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
            reason: str = delta["stop_reason"]
            self._stop_reason = _STOP_REASONS.get(reason, reason.lower())
        self._take_usage(data.get("usage"))

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
        # output_tokens is cumulative (message_start already has a first count): the latest value is the total.
        if isinstance(usage.get("output_tokens"), int):
            self._output_tokens = usage["output_tokens"]

    def _stream_error(self, data: Mapping[str, Any]) -> ProviderError:
        err = error_object(data)
        kind = str(err.get("type") or "")
        message = clean_message(str(err.get("message") or "error in stream"), self._api_key)
        if _is_quota(err):
            return ProviderError("quota_exhausted", message)
        code, retryable = _ERROR_TYPES.get(kind, ("provider_error", False))
        return ProviderError(code, f"{kind}: {message}" if kind else message, retryable=retryable)


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

    @staticmethod
    def _body(request: GenerationRequest) -> dict[str, Any]:
        # The API has no system role: system text is one top-level string.
        system = [content_text(m.get("content")) for m in request.messages if m["role"] == "system"]
        messages = [
            {"role": m["role"], "content": content_text(m.get("content"))}
            for m in request.messages
            if m["role"] != "system"
        ]
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS,
            "stream": True,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop is not None:
            body["stop_sequences"] = list(request.stop)
        return body

    def _classify(self, status: int, body: object, headers: Mapping[str, str]) -> ProviderError:
        err = error_object(body)
        message = clean_message(str(err.get("message") or ""), self._config.api_key)
        if _is_quota(err):
            return status_error(status, message, headers, code="quota_exhausted", retryable=False)
        if status == 529 or err.get("type") == "overloaded_error":
            return status_error(status, message, headers, code="overloaded", retryable=True)
        return status_error(status, message, headers)
