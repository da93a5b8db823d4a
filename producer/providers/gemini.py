"""Google Gemini streaming (`POST {base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse`).

Wire format: unnamed `data:` events (lines end in CRLF) holding GenerateContentResponse objects, text in
`candidates[0].content.parts[].text`. There is no terminator: the chunk with `finishReason` is the last one.
Without `alt=sse` the same endpoint answers with one JSON array, which is why the query parameter is not optional.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from producer.providers._http import (
    SSEProvider,
    clean_message,
    error_object,
    load_object,
    parse_duration_s,
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

__all__ = ["DEFAULT_BASE_URL", "GeminiProvider"]

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"  # the server root: the path carries the version

_FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"} | {reason: "content_filter" for reason in _FILTERED}
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _details(err: Mapping[str, Any], type_url: str) -> list[dict[str, Any]]:
    details = err.get("details")
    if not isinstance(details, list):
        return []
    return [d for d in details if isinstance(d, dict) and d.get("@type") == type_url]


def _per_day_quota(err: Mapping[str, Any]) -> bool:
    # A 429 lists every quota it hit; one per-day quota among them means no retry helps before tomorrow, even
    # though the same answer also carries a RetryInfo of a few seconds.
    for detail in _details(err, _QUOTA_FAILURE):
        violations = detail.get("violations")
        if isinstance(violations, list) and any(
            isinstance(v, dict) and "PerDay" in str(v.get("quotaId") or "") for v in violations
        ):
            return True
    return False


def _retry_delay_s(err: Mapping[str, Any]) -> float | None:
    for detail in _details(err, _RETRY_INFO):
        if (delay := parse_duration_s(detail.get("retryDelay"))) is not None:
            return delay
    return None


def _api_key_invalid(err: Mapping[str, Any]) -> bool:
    # A bad key is a 400 INVALID_ARGUMENT, not a 401: only ErrorInfo.reason tells it from a bad request.
    return any(d.get("reason") == "API_KEY_INVALID" for d in _details(err, _ERROR_INFO))


def _overloaded(status: int, message: str) -> str | None:
    # "503 The model is overloaded" is Gemini's equivalent of Anthropic's 529: give it the same code.
    return "overloaded" if status == 503 and "overloaded" in message.lower() else None


class _Decoder:
    def __init__(self, api_key: str | None) -> None:
        self._api_key = api_key
        self._finish_reason: str | None = None
        self._input_tokens: int | None = None
        self._output_tokens: int | None = None

    def feed(self, event: SSEEvent) -> list[StreamItem]:
        if not event.data.strip():
            return []
        chunk = load_object(event.data)
        if chunk.get("error"):
            raise self._stream_error(chunk)
        usage_seen = self._take_usage(chunk.get("usageMetadata"))
        items: list[StreamItem] = []
        candidates = chunk.get("candidates")
        if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
            candidate = candidates[0]
            items.extend(self._texts(candidate))
            reason = candidate.get("finishReason")
            if isinstance(reason, str) and reason:
                self._finish_reason = _FINISH_REASONS.get(reason, reason.lower())
        else:
            feedback = chunk.get("promptFeedback")
            if isinstance(feedback, dict) and feedback.get("blockReason"):
                # The prompt itself was blocked: no candidate will ever come.
                self._finish_reason = "content_filter"
        # The finishing chunk normally carries the final usage too; then it is the end. If it did not, wait for the
        # end of the body, in case usage follows in a chunk of its own.
        if self._finish_reason is not None and usage_seen:
            items.append(self._finish())
        return items

    def end(self, cut: ProviderError | None) -> Finish:
        if self._finish_reason is not None:
            return self._finish()
        raise cut or truncated("the stream ended before any finishReason")

    def _finish(self) -> Finish:
        return Finish(self._finish_reason or "stop", self._input_tokens, self._output_tokens)

    @staticmethod
    def _texts(candidate: Mapping[str, Any]) -> list[StreamItem]:
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list):
            return []
        # Thought summaries (`"thought": true`) are reasoning, not part of the answer.
        return [
            ReasoningDelta(part["text"]) if part.get("thought") else TextDelta(part["text"])
            for part in parts
            if isinstance(part, dict) and isinstance(part.get("text"), str) and part["text"]
        ]

    def _take_usage(self, usage: object) -> bool:
        if not isinstance(usage, dict):
            return False
        self._input_tokens = _int_or_none(usage.get("promptTokenCount"))
        # candidatesTokenCount is absent, not 0, when nothing was generated; thinking tokens are output tokens too
        # (billed as such, and counted so by the other providers), but reported apart.
        candidates = _int_or_none(usage.get("candidatesTokenCount"))
        thoughts = _int_or_none(usage.get("thoughtsTokenCount"))
        if candidates is not None or thoughts is not None:
            self._output_tokens = (candidates or 0) + (thoughts or 0)
        return True

    def _stream_error(self, chunk: Mapping[str, Any]) -> ProviderError:
        err = error_object(chunk)
        status = _int_or_none(err.get("code"))
        message = clean_message(str(err.get("message") or "error in stream"), self._api_key)
        if status is None:
            return ProviderError("provider_error", message)
        error = status_error(status, message, {}, code=_overloaded(status, message), after_s=_retry_delay_s(err))
        return ProviderError(error.code, error.message, retryable=error.retryable, after_s=error.after_s)


class GeminiProvider(SSEProvider):
    """`streamGenerateContent?alt=sse`; see the module docstring for the wire format."""

    name = "gemini"
    kind = "gemini"
    default_base_url = DEFAULT_BASE_URL
    decoder = _Decoder

    def _url(self, request: GenerationRequest) -> str:
        # "models/gemini-x" is how the API names models in its own listings; accept both spellings.
        model = quote(request.model.removeprefix("models/"), safe="")
        return f"{self._root}/v1beta/models/{model}:streamGenerateContent?alt=sse"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._config.api_key:
            # A header, not the `key=` query parameter: URLs end up in logs and exception messages.
            headers["x-goog-api-key"] = self._config.api_key
        return headers

    @staticmethod
    def _body(request: GenerationRequest) -> dict[str, Any]:
        system = [content_text(m.get("content")) for m in request.messages if m["role"] == "system"]
        body: dict[str, Any] = {
            "contents": [
                {
                    "role": "model" if m["role"] == "assistant" else "user",
                    "parts": [{"text": content_text(m.get("content"))}],
                }
                for m in request.messages
                if m["role"] != "system"
            ]
        }
        if system:
            body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
        config = {
            "maxOutputTokens": request.max_tokens,
            "temperature": request.temperature,
            "topP": request.top_p,
            "stopSequences": list(request.stop) if request.stop is not None else None,
        }
        config = {k: v for k, v in config.items() if v is not None}
        if config:
            body["generationConfig"] = config
        return body

    def _classify(self, status: int, body: object, headers: Mapping[str, str]) -> ProviderError:
        err = error_object(body)
        message = clean_message(str(err.get("message") or ""), self._config.api_key)
        if status == 429 and _per_day_quota(err):
            return status_error(status, message, headers, code="quota_exhausted", retryable=False)
        if _api_key_invalid(err):
            return status_error(status, message, headers, code="auth", retryable=False)
        # Google sends no Retry-After; the delay is in the body.
        after_s = _retry_delay_s(err) if headers.get("retry-after") is None else None
        return status_error(status, message, headers, code=_overloaded(status, message), after_s=after_s)
