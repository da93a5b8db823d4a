"""Google Gemini streaming (`POST {base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse`).

Wire format: unnamed `data:` events (lines end in CRLF) holding GenerateContentResponse objects, text in
`candidates[0].content.parts[].text`. There is no terminator: the chunk with `finishReason` is the last one.
Without `alt=sse` the same endpoint answers with one JSON array, which is why the query parameter is not optional.

Thoughts (`"thought": true` text parts) are reasoning; `functionCall` parts arrive whole, mostly without an id. Any
part may carry a `thoughtSignature`, which Gemini wants back on the same part of the next request (a 400 without it,
for calls of Gemini 3 models): `Finish.provider_state` keeps each one by the part it came on (see `_Decoder._state`).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import orjson

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
    ToolCallDelta,
    ToolCallEnd,
)
from ssecore.chat import assistant_state, content_text, data_url_mime
from ssecore.sse import SSEEvent

__all__ = ["DEFAULT_BASE_URL", "GeminiProvider"]

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"  # the server root: the path carries the version

_FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"} | {reason: "content_filter" for reason in _FILTERED}
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
# Keys of Finish.provider_state: the text part's signature, and {call id: signature} for the call parts.
_TEXT_SIGNATURE = "text_signature"
_CALL_SIGNATURES = "call_signatures"


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
        self._reasoning_tokens: int | None = None
        self._cached_tokens: int | None = None
        self._calls = 0  # calls so far: the next one's index
        self._text_signature: str | None = None
        self._call_signatures: dict[str, str] = {}  # call id -> the signature its part carried

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
            items.extend(self._parts(candidate))
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
        reason = self._finish_reason or "stop"
        # Gemini ends an answer that calls functions with STOP, like any other.
        if reason == "stop" and self._calls:
            reason = "tool_calls"
        return Finish(
            reason,
            self._input_tokens,
            self._output_tokens,
            reasoning_tokens=self._reasoning_tokens,
            cached_input_tokens=self._cached_tokens,
            provider_state=self._state(),
        )

    def _state(self) -> dict[str, Any] | None:
        """Where each signature goes back: each call's on that call's part, found by its id; any other on the text part
        (the message's text goes back as one part, and its thoughts not at all)."""
        state: dict[str, Any] = {}
        if self._text_signature is not None:
            state[_TEXT_SIGNATURE] = self._text_signature
        if self._call_signatures:
            state[_CALL_SIGNATURES] = dict(self._call_signatures)
        return state or None

    def _parts(self, candidate: Mapping[str, Any]) -> list[StreamItem]:
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list):
            return []
        return [item for part in parts if isinstance(part, dict) for item in self._part(part)]

    def _part(self, part: Mapping[str, Any]) -> list[StreamItem]:
        signature = part.get("thoughtSignature")
        signature = signature if isinstance(signature, str) and signature else None
        call = part.get("functionCall")
        if isinstance(call, dict):
            return self._call(call, signature)
        if signature is not None:
            # Often on a part of its own, with empty text, at the end of the stream: kept all the same.
            self._text_signature = signature
        text = part.get("text")
        if not isinstance(text, str) or not text:
            return []
        # Thought summaries (`"thought": true`) are reasoning, not part of the answer.
        return [ReasoningDelta(text) if part.get("thought") else TextDelta(text)]

    def _call(self, call: Mapping[str, Any], signature: str | None) -> list[StreamItem]:
        index, self._calls = self._calls, self._calls + 1
        given = call.get("id")
        call_id = given if isinstance(given, str) and given else "call_" + secrets.token_hex(12)
        name = call.get("name")
        args = call.get("args")
        arguments = orjson.dumps(args if isinstance(args, dict) else {}).decode()
        if signature is not None:
            self._call_signatures[call_id] = signature
        # A call comes whole: one delta, and it is complete.
        return [ToolCallDelta(index, arguments, call_id, name if isinstance(name, str) else ""), ToolCallEnd(index)]

    def _take_usage(self, usage: object) -> bool:
        if not isinstance(usage, dict):
            return False
        # promptTokenCount includes cachedContentTokenCount, as input_tokens includes cached_input_tokens.
        self._input_tokens = _int_or_none(usage.get("promptTokenCount"))
        self._cached_tokens = _int_or_none(usage.get("cachedContentTokenCount"))
        # candidatesTokenCount is absent, not 0, when nothing was generated; thinking tokens are output tokens too
        # (billed as such, and counted so by the other providers), but reported apart.
        candidates = _int_or_none(usage.get("candidatesTokenCount"))
        thoughts = _int_or_none(usage.get("thoughtsTokenCount"))
        self._reasoning_tokens = thoughts
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


# --- the request ------------------------------------------------------------------------------------------------------

_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
# reasoning_effort as a thinking budget in tokens: within what every thinking model takes (2.5 Flash and Flash-Lite
# top out at 24576, 2.5 Pro at 32768; Gemini 3 still takes a budget, besides its own thinking levels).
_THINKING_BUDGETS = {"low": 1024, "medium": 8192, "high": 24576}


def _inline(url: str, path: str) -> dict[str, Any]:
    mime = data_url_mime(url)
    if mime is None:
        # ssecore.capabilities refuses links for this kind; a request that skipped the check fails here, named.
        raise ProviderError("bad_request", f"{path}: Gemini takes data: URLs only, not links")
    return {"inlineData": {"mimeType": mime, "data": url.partition(",")[2]}}


def _user_parts(content: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return [{"text": content_text(content)}]
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if part["type"] == "text":
            parts.append({"text": part["text"]})
        elif part["type"] == "image_url":
            parts.append(_inline(part["image_url"]["url"], f"{path}.content[{j}].image_url.url"))
        else:
            parts.append(_inline(part["file"]["file_data"], f"{path}.content[{j}].file.file_data"))
    return parts


def _arguments(arguments: str, path: str) -> dict[str, Any]:
    # Gemini takes a call's arguments as an object, not as the JSON text the message holds.
    try:
        args = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise ProviderError("bad_request", f"{path}: Gemini needs the arguments as a JSON object")
    return args


def _model_parts(m: Mapping[str, Any], path: str) -> list[dict[str, Any]]:
    """An assistant message as Gemini's model content, each signature back on the part it came with."""
    state = assistant_state(m, "gemini")
    parts: list[dict[str, Any]] = []
    text = content_text(m.get("content")) or m.get("refusal") or ""
    signature = state.get(_TEXT_SIGNATURE)
    if text or isinstance(signature, str):
        part: dict[str, Any] = {"text": text}
        if isinstance(signature, str):
            part["thoughtSignature"] = signature
        parts.append(part)
    signatures = state.get(_CALL_SIGNATURES)
    signatures = signatures if isinstance(signatures, dict) else {}
    for k, call in enumerate(m.get("tool_calls") or ()):
        function = call["function"]
        args = _arguments(function["arguments"], f"{path}.tool_calls[{k}].function.arguments")
        part = {"functionCall": {"name": function["name"], "args": args}}
        if isinstance(signatures.get(call["id"]), str):
            part["thoughtSignature"] = signatures[call["id"]]
        parts.append(part)
    return parts


def _function_response(m: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    # Gemini knows a result by the function's name, not by a call id; a JSON object result goes as it is.
    text = content_text(m.get("content"))
    try:
        result = orjson.loads(text)
    except orjson.JSONDecodeError:
        result = None
    response = result if isinstance(result, dict) else {"result": text}
    return {"functionResponse": {"name": names.get(m["tool_call_id"], ""), "response": response}}


def _results_last(contents: list[dict[str, Any]]) -> bool:
    return bool(contents) and all("functionResponse" in part for part in contents[-1]["parts"])


def _contents(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id -> function name, for the results that answer them
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "assistant":
            names.update((c["id"], c["function"]["name"]) for c in m.get("tool_calls") or ())
            contents.append({"role": "model", "parts": _model_parts(m, f"messages[{i}]")})
        elif role == "tool":
            # The results of one answer's calls go back together, as one user content.
            part = _function_response(m, names)
            if _results_last(contents):
                contents[-1]["parts"].append(part)
            else:
                contents.append({"role": "user", "parts": [part]})
        elif role == "user":
            contents.append({"role": "user", "parts": _user_parts(m.get("content"), f"messages[{i}]")})
    return contents


def _tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    declarations: list[dict[str, Any]] = []
    for tool in tools:
        function = tool["function"]
        declaration: dict[str, Any] = {"name": function["name"]}
        if function.get("description"):
            declaration["description"] = function["description"]
        if function.get("parameters") is not None:
            # parametersJsonSchema takes JSON Schema as it is; `parameters` is Google's own OpenAPI subset.
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return [{"functionDeclarations": declarations}]


def _tool_config(choice: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(choice, str):
        return {"functionCallingConfig": {"mode": _MODES[choice]}}
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}}


def _schema(fmt: Mapping[str, Any] | None) -> Any:
    # responseJsonSchema takes JSON Schema as it is; responseSchema is Google's own OpenAPI subset.
    return fmt["json_schema"]["schema"] if fmt is not None and fmt["type"] == "json_schema" else None


def _generation_config(request: GenerationRequest) -> dict[str, Any]:
    fmt = request.response_format
    effort = request.reasoning_effort
    config = {
        "maxOutputTokens": request.max_tokens,
        "temperature": request.temperature,
        "topP": request.top_p,
        "stopSequences": list(request.stop) if request.stop is not None else None,
        "responseMimeType": "application/json" if fmt is not None else None,
        "responseJsonSchema": _schema(fmt),
        # includeThoughts: without it the model thinks but shows nothing of it.
        "thinkingConfig": {"thinkingBudget": _THINKING_BUDGETS[effort], "includeThoughts": True} if effort else None,
    }
    return {k: v for k, v in config.items() if v is not None}


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
        system = [content_text(m.get("content")) for m in request.messages if m["role"] in ("system", "developer")]
        body: dict[str, Any] = {"contents": _contents(request.messages)}
        if system:
            body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
        if request.tools:
            body["tools"] = _tools(request.tools)
            if request.tool_choice is not None:
                body["toolConfig"] = _tool_config(request.tool_choice)
        config = _generation_config(request)
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
