"""A fake AI provider server for tests: the OpenAI (also as Azure OpenAI serves it), Anthropic and Gemini streaming wire
formats on one aiohttp app.

The model name of a request picks its `Behaviour` (see `PRESETS`; add your own to `FakeProviders.behaviours`).
Every request is recorded (headers, JSON body, attempt number), with whether the client went away mid-stream.

    async with FakeProviders() as fake:
        fake.behaviours["pace"] = Behaviour(tokens=numbered_tokens(50), pace_s=0.01)
        provider = OpenAIProvider(fake.config("openai"))
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from producer.providers.base import ProviderConfig
from producer.settings import ProviderKeys

__all__ = [
    "DEFAULT_TOKENS",
    "PRESETS",
    "TEST_API_KEY",
    "Behaviour",
    "FakeCall",
    "FakeProviders",
    "ProviderName",
    "RecordedRequest",
    "Reject",
    "numbered_tokens",
]

ProviderName = Literal["openai", "openai-responses", "azure-openai", "anthropic", "gemini"]
Reject = Literal["rate_limit", "quota", "auth", "bad_request", "not_found", "overloaded", "server_error", "html"]

TEST_API_KEY = "sk-test-0123456789abcdef"
DEFAULT_TOKENS = ("Hello", ",", " wor", "ld", "!")
# Long enough for the two halves of a write to reach the client in two separate reads.
SPLIT_PAUSE_S = 0.05
# How often a sleeping handler looks whether its client is still there.
_POLL_S = 0.01


def numbered_tokens(n: int) -> tuple[str, ...]:
    """n distinct tokens, "t0 " … "t{n-1} ", so a test can tell which ones arrived."""
    return tuple(f"t{i} " for i in range(n))


@dataclass(frozen=True, slots=True)
class FakeCall:
    """A tool call the fake answers with: `arguments` is sent in these fragments (one whole where the provider
    sends calls whole); `id` as the provider would give it (Gemini gives none)."""

    name: str
    arguments: tuple[str, ...]
    id: str = "call_fake_0"

    @property
    def whole(self) -> str:
        return "".join(self.arguments)


@dataclass(frozen=True, slots=True, kw_only=True)
class Behaviour:
    """What the server does with one request. `*_after=n` acts after n tokens (0: before the first one)."""

    tokens: tuple[str, ...] = DEFAULT_TOKENS
    head_delay_s: float = 0.0  # before the response head (a model thinking before anything is sent)
    first_token_delay_s: float = 0.0  # after the response head, before the first token
    pace_s: float = 0.0  # between two tokens
    split_utf8: bool = False  # write each token's event in two writes, cutting through a multi-byte character
    finish_reason: str = "stop"  # normalized ("stop", "length", "content_filter", "tool_calls"), sent in provider words
    usage: bool = True  # send token counts
    input_tokens: int = 9
    done_marker: bool = True  # OpenAI: end with `data: [DONE]`
    cut_after: int | None = None  # close the connection
    end_after: int | None = None  # end the response properly, but without the provider's end of answer
    malformed_after: int | None = None  # send a data line that is not JSON, then end the response
    error_after: int | None = None  # send the provider's in-stream error event, then end the response
    reject: Reject | None = None  # answer with this HTTP error instead of a stream
    reject_times: int | None = None  # reject only the first n attempts for this model (None: every one)
    retry_after: str | None = "1"  # rate_limit and overloaded: Retry-After (Gemini: RetryInfo.retryDelay seconds)
    reasoning: tuple[str, ...] = ()  # reasoning (thinking) pieces, sent before the tokens
    signature: str | None = None  # the provider's signature of that reasoning (Anthropic, Gemini)
    # Tool calls, sent after the tokens; the finish reason becomes the provider's "tool use" one. A request that
    # already carries a tool result is answered with the tokens alone: an agent loop's second turn.
    tool_calls: tuple[FakeCall, ...] = ()
    call_text: tuple[str, ...] = ()  # the tokens of the turn that calls the tools


PRESETS: dict[str, Behaviour] = {
    "normal": Behaviour(),
    "retry-once": Behaviour(reject="rate_limit", reject_times=1, retry_after="2"),
    "rate-limited": Behaviour(reject="rate_limit"),
    "quota": Behaviour(reject="quota"),
    "auth": Behaviour(reject="auth"),
    "bad-request": Behaviour(reject="bad_request"),
    "not-found": Behaviour(reject="not_found"),
    "overloaded": Behaviour(reject="overloaded"),
    "server-error": Behaviour(reject="server_error"),
    "html": Behaviour(reject="html"),
    "cut": Behaviour(cut_after=2),
    "cut-at-end": Behaviour(cut_after=len(DEFAULT_TOKENS)),
    "end-early": Behaviour(end_after=3),
    "malformed": Behaviour(malformed_after=1),
    "stream-error": Behaviour(error_after=2),
    "slow-first": Behaviour(first_token_delay_s=0.5),
    "slow": Behaviour(tokens=numbered_tokens(200), pace_s=0.05),
    "split-utf8": Behaviour(tokens=("h", "é", "llo ", "wörld ", "🌍", "!"), split_utf8=True),
    "length": Behaviour(finish_reason="length"),
    "no-usage": Behaviour(usage=False),
    "no-done": Behaviour(done_marker=False),
    "think": Behaviour(reasoning=("Let me ", "think."), signature="sig-fake-1"),
    "tool": Behaviour(
        tokens=("It is ", "sunny."),
        call_text=("Checking.",),
        reasoning=("Weather ", "needed."),
        signature="sig-fake-1",
        tool_calls=(FakeCall("get_weather", ('{"ci', 'ty": "Par', 'is"}'), "call_fake_0"),),
    ),
    "tools": Behaviour(
        tokens=("Both ", "done."),
        tool_calls=(
            FakeCall("get_weather", ('{"city":', ' "Paris"}'), "call_fake_0"),
            FakeCall("get_time", ('{"zone": "CET"}',), "call_fake_1"),
        ),
    ),
}


@dataclass(slots=True)
class RecordedRequest:
    """One request as the server saw it."""

    provider: ProviderName
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON body
    model: str
    attempt: int  # 1 for the first request for this provider and model
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)  # the client left before the end
    completed: bool = False  # the whole response was written


@dataclass(frozen=True, slots=True)
class _Step:
    kind: Literal["write", "split", "sleep", "cut", "end"]
    data: bytes = b""
    seconds: float = 0.0


class _Cut(Exception):
    pass


def _sse(data: object, *, event: str | None = None, eol: str = "\n") -> bytes:
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    head = f"event: {event}{eol}" if event else ""
    return f"{head}data: {payload}{eol}{eol}".encode()


def _json_response(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _retry_headers(b: Behaviour) -> dict[str, str]:
    return {"Retry-After": b.retry_after} if b.retry_after is not None else {}


def _html_response() -> web.Response:
    return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html")


class _OpenAIWire:
    provider: ProviderName = "openai"

    def _chunk(self, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        # Fields a client must tolerate ride along: system_fingerprint, logprobs, obfuscation, usage: null.
        return _sse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                "usage": None,
                "obfuscation": "x1y2",
            }
        )

    def head(self, b: Behaviour, model: str) -> list[bytes]:
        return [b": keep-alive\n\n", self._chunk(model, {"role": "assistant", "content": "", "refusal": None})]

    def token(self, b: Behaviour, text: str, model: str) -> bytes:
        return self._chunk(model, {"content": text})

    def tail(self, b: Behaviour, model: str) -> list[bytes]:
        out = [self._chunk(model, {}, b.finish_reason)]
        if b.usage:
            n = len(b.tokens)
            usage = {"prompt_tokens": b.input_tokens, "completion_tokens": n, "total_tokens": b.input_tokens + n}
            out.append(_sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        if b.done_marker:
            out.append(b"data: [DONE]\n\n")
        return out

    def reasoning(self, b: Behaviour, model: str) -> list[bytes]:
        # DeepSeek and vLLM's field; OpenRouter's `reasoning` is read the same way.
        return [self._chunk(model, {"reasoning_content": text}) for text in b.reasoning]

    def calls(self, b: Behaviour, model: str) -> list[bytes]:
        out: list[bytes] = []
        for index, call in enumerate(b.tool_calls):
            first, *rest = call.arguments
            head = {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": first},
            }
            out.append(self._chunk(model, {"tool_calls": [head]}))
            out.extend(
                self._chunk(model, {"tool_calls": [{"index": index, "function": {"arguments": a}}]}) for a in rest
            )
        return out

    @staticmethod
    def answered(body: Any) -> bool:
        messages = body.get("messages") if isinstance(body, dict) else None
        return isinstance(messages, list) and bool(messages) and messages[-1].get("role") == "tool"

    def malformed(self) -> bytes:
        return b'data: {"choices": [{"delta": \n\n'

    def stream_error(self) -> bytes:
        error = {"message": "The server had an error while processing your request.", "type": "server_error"}
        return _sse({"error": {**error, "param": None, "code": None}})

    def reject(self, kind: Reject, b: Behaviour, rec: RecordedRequest) -> web.Response:
        def err(status: int, message: str, type_: str, code: str | None, **headers: str) -> web.Response:
            body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
            return _json_response(status, body, headers)

        if kind == "rate_limit":
            return err(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded", **_retry_headers(b))
        if kind == "quota":
            msg = "You exceeded your current quota, please check your plan and billing details."
            return err(429, msg, "insufficient_quota", "insufficient_quota")
        if kind == "auth":
            # The real API echoes a masked key; echoing it whole checks the client never passes it on.
            key = rec.headers.get("authorization", "").removeprefix("Bearer ")
            return err(401, f"Incorrect API key provided: {key}.", "invalid_request_error", "invalid_api_key")
        if kind in ("bad_request", "not_found"):
            status, msg = (400, "Invalid value for 'temperature'.") if kind == "bad_request" else (404, "No such model")
            return err(status, msg, "invalid_request_error", None)
        if kind == "overloaded":
            return err(503, "The engine is currently overloaded.", "server_error", None, **_retry_headers(b))
        if kind == "server_error":
            return err(500, "The server had an error while processing your request.", "server_error", None)
        return _html_response()


_RESPONSES_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class _AzureWire(_OpenAIWire):
    """Azure OpenAI's stream is OpenAI's; only the URL (the deployment in the path) and the key's header differ."""

    provider: ProviderName = "azure-openai"


class _ResponsesWire:
    """OpenAI's Responses API: named events, each numbered, about output items (reasoning, message, function_call)
    opened and closed around their deltas. One instance per response: it numbers the events and the items."""

    provider: ProviderName = "openai-responses"

    def __init__(self) -> None:
        self._sequence = 0
        self._output: list[dict[str, Any]] = []  # finished items, for the final response object
        self._message: dict[str, Any] | None = None  # the message item being written
        self._model = ""

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return _sse(data, event=kind)

    def _response(self, status: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": "resp_fake",
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": self._model,
            "output": list(self._output),
            "error": None,
            "incomplete_details": None,
            "usage": None,
            **fields,
        }

    def _added(self, item: dict[str, Any]) -> tuple[int, bytes]:
        index = len(self._output) + (self._message is not None)
        return index, self._event("response.output_item.added", output_index=index, item=item)

    def _done(self, index: int, item: dict[str, Any]) -> bytes:
        self._output.append(item)
        return self._event("response.output_item.done", output_index=index, item=item)

    def head(self, b: Behaviour, model: str) -> list[bytes]:
        self._model = model
        return [
            self._event("response.created", response=self._response("in_progress")),
            self._event("response.in_progress", response=self._response("in_progress")),
        ]

    def reasoning(self, b: Behaviour, model: str) -> list[bytes]:
        if not b.reasoning:
            return []
        item: dict[str, Any] = {"id": "rs_fake_0", "type": "reasoning", "summary": []}
        index, added = self._added(item)
        at = {"item_id": item["id"], "output_index": index, "summary_index": 0}
        text = "".join(b.reasoning)
        part = {"type": "summary_text", "text": text}
        out = [added, self._event("response.reasoning_summary_part.added", **at, part={**part, "text": ""})]
        out += [self._event("response.reasoning_summary_text.delta", **at, delta=d) for d in b.reasoning]
        out.append(self._event("response.reasoning_summary_text.done", **at, text=text))
        out.append(self._event("response.reasoning_summary_part.done", **at, part=part))
        done = {**item, "summary": [part]}
        if b.signature is not None:
            done["encrypted_content"] = b.signature
        return [*out, self._done(index, done)]

    def token(self, b: Behaviour, text: str, model: str) -> bytes:
        opening = b""
        if self._message is None:
            item = {"id": "msg_fake", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            index, opening = self._added(item)
            self._message = {**item, "output_index": index, "text": ""}
            part = {"type": "output_text", "text": "", "annotations": []}
            at = {"item_id": "msg_fake", "output_index": index, "content_index": 0}
            opening += self._event("response.content_part.added", **at, part=part)
        self._message["text"] += text
        at = {"item_id": "msg_fake", "output_index": self._message["output_index"], "content_index": 0}
        return opening + self._event("response.output_text.delta", **at, delta=text, logprobs=[])

    def _close_message(self) -> list[bytes]:
        if self._message is None:
            return []
        message, self._message = self._message, None
        index, text = message.pop("output_index"), message.pop("text")
        part = {"type": "output_text", "text": text, "annotations": []}
        at = {"item_id": "msg_fake", "output_index": index, "content_index": 0}
        return [
            self._event("response.output_text.done", **at, text=text, logprobs=[]),
            self._event("response.content_part.done", **at, part=part),
            self._done(index, {**message, "status": "completed", "content": [part]}),
        ]

    def calls(self, b: Behaviour, model: str) -> list[bytes]:
        out = self._close_message()
        for n, call in enumerate(b.tool_calls):
            item = {"id": f"fc_fake_{n}", "type": "function_call", "status": "in_progress", "arguments": ""}
            item.update(call_id=call.id, name=call.name)
            index, added = self._added(item)
            at = {"item_id": item["id"], "output_index": index}
            out.append(added)
            out += [self._event("response.function_call_arguments.delta", **at, delta=a) for a in call.arguments]
            out.append(self._event("response.function_call_arguments.done", **at, arguments=call.whole))
            out.append(self._done(index, {**item, "status": "completed", "arguments": call.whole}))
        return out

    def tail(self, b: Behaviour, model: str) -> list[bytes]:
        out = self._close_message()
        usage = None
        if b.usage:
            reasoning, output = len(b.reasoning), len(b.tokens) + len(b.reasoning)
            usage = {
                "input_tokens": b.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": b.input_tokens + output,
            }
        reason = _RESPONSES_INCOMPLETE.get(b.finish_reason)
        if reason is None:
            response = self._response("completed", usage=usage)
            return [*out, self._event("response.completed", response=response)]
        response = self._response("incomplete", usage=usage, incomplete_details={"reason": reason})
        return [*out, self._event("response.incomplete", response=response)]

    @staticmethod
    def answered(body: Any) -> bool:
        items = body.get("input") if isinstance(body, dict) else None
        return isinstance(items, list) and any(
            isinstance(i, dict) and i.get("type") == "function_call_output" for i in items
        )

    def malformed(self) -> bytes:
        return b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "delta": \n\n'

    def stream_error(self) -> bytes:
        error = {"code": "server_error", "message": "The server had an error while processing your request."}
        return self._event("response.failed", response=self._response("failed", error=error))

    def reject(self, kind: Reject, b: Behaviour, rec: RecordedRequest) -> web.Response:
        return _OpenAIWire().reject(kind, b, rec)  # the same API's error bodies


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal", "tool_calls": "tool_use"}


class _AnthropicWire:
    """Content blocks in the API's one sequence: thinking (when the behaviour reasons), text (when it has tokens),
    then one tool_use block per call."""

    provider: ProviderName = "anthropic"

    @staticmethod
    def _text_index(b: Behaviour) -> int:
        return 1 if b.reasoning else 0

    @staticmethod
    def _block(kind: str, index: int, **data: Any) -> bytes:
        return _sse({"type": kind, "index": index, **data}, event=kind)

    def _delta(self, index: int, kind: str, **data: Any) -> bytes:
        return self._block("content_block_delta", index, delta={"type": kind, **data})

    def head(self, b: Behaviour, model: str) -> list[bytes]:
        message: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if b.usage:
            message["usage"] = {
                "input_tokens": b.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            }
        return [
            _sse({"type": "message_start", "message": message}, event="message_start"),
            _sse({"type": "ping"}, event="ping"),
            # New event types may appear at any time; clients must ignore them.
            _sse({"type": "some_future_event", "detail": 1}, event="some_future_event"),
        ]

    def reasoning(self, b: Behaviour, model: str) -> list[bytes]:
        """The thinking block, if any, then the start of the text block the tokens go into."""
        out: list[bytes] = []
        if b.reasoning:
            out.append(self._block("content_block_start", 0, content_block={"type": "thinking", "thinking": ""}))
            out.extend(self._delta(0, "thinking_delta", thinking=t) for t in b.reasoning)
            if b.signature is not None:
                out.append(self._delta(0, "signature_delta", signature=b.signature))
            out.append(self._block("content_block_stop", 0))
        if b.tokens:
            text = {"type": "text", "text": ""}
            out.append(self._block("content_block_start", self._text_index(b), content_block=text))
        return out

    def token(self, b: Behaviour, text: str, model: str) -> bytes:
        return self._delta(self._text_index(b), "text_delta", text=text)

    def calls(self, b: Behaviour, model: str) -> list[bytes]:
        """The end of the text block, then each call: its id and name, then its arguments in fragments."""
        out = [self._block("content_block_stop", self._text_index(b))] if b.tokens else []
        first = self._text_index(b) + (1 if b.tokens else 0)
        for index, call in enumerate(b.tool_calls, start=first):
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            out.append(self._block("content_block_start", index, content_block=block))
            out.extend(self._delta(index, "input_json_delta", partial_json=a) for a in call.arguments)
            out.append(self._block("content_block_stop", index))
        return out

    def tail(self, b: Behaviour, model: str) -> list[bytes]:
        reason = _ANTHROPIC_STOP.get(b.finish_reason, b.finish_reason)
        delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None}}
        if b.usage:
            delta["usage"] = {"output_tokens": len(b.tokens)}
        return [_sse(delta, event="message_delta"), _sse({"type": "message_stop"}, event="message_stop")]

    @staticmethod
    def answered(body: Any) -> bool:
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            return False
        content = messages[-1].get("content")
        return isinstance(content, list) and any(
            isinstance(block, dict) and block.get("type") == "tool_result" for block in content
        )

    def malformed(self) -> bytes:
        return b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": \n\n'

    def stream_error(self) -> bytes:
        return _sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, event="error")

    def reject(self, kind: Reject, b: Behaviour, rec: RecordedRequest) -> web.Response:
        def err(status: int, type_: str, message: str, **headers: str) -> web.Response:
            body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_fake"}
            return _json_response(status, body, headers)

        if kind == "rate_limit":
            return err(429, "rate_limit_error", "Your account has hit a rate limit.", **_retry_headers(b))
        if kind == "quota":
            msg = "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing."
            return err(400, "invalid_request_error", msg)
        if kind == "auth":
            return err(401, "authentication_error", f"invalid x-api-key {rec.headers.get('x-api-key', '')}")
        if kind == "bad_request":
            return err(400, "invalid_request_error", "messages: field required")
        if kind == "not_found":
            return err(404, "not_found_error", "model: no-such-model")
        if kind == "overloaded":
            return err(529, "overloaded_error", "Overloaded", **_retry_headers(b))
        if kind == "server_error":
            return err(500, "api_error", "Internal server error")
        return _html_response()


_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
_GOOGLE_RPC = "type.googleapis.com/google.rpc."


class _GeminiWire:
    provider: ProviderName = "gemini"
    eol = "\r\n"  # Google's SSE lines end in CRLF

    def _chunk(self, b: Behaviour, parts: list[dict[str, Any]], finish_reason: str | None = None) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish_reason is not None:
            candidate["finishReason"] = finish_reason
        chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-fake", "responseId": "r-fake"}
        if b.usage:
            usage: dict[str, int] = {"promptTokenCount": b.input_tokens, "totalTokenCount": b.input_tokens}
            if finish_reason is not None:
                usage["candidatesTokenCount"] = len(b.tokens)
                usage["totalTokenCount"] += len(b.tokens)
                if b.reasoning:
                    usage["thoughtsTokenCount"] = len(b.reasoning)
                    usage["totalTokenCount"] += len(b.reasoning)
            chunk["usageMetadata"] = usage
        return chunk

    def _last(self, b: Behaviour) -> dict[str, Any]:
        # Gemini ends an answer that calls functions with STOP, like any other. Without calls, the signature comes
        # on the last part: in a stream, an empty text part of its own.
        reason = "STOP" if b.finish_reason == "tool_calls" else _GEMINI_FINISH.get(b.finish_reason)
        part: dict[str, Any] = {"text": ""}
        if b.signature is not None and not b.tool_calls:
            part["thoughtSignature"] = b.signature
        return self._chunk(b, [part], reason or b.finish_reason.upper())

    def chunks(self, b: Behaviour) -> list[dict[str, Any]]:
        """The whole answer as objects: what the endpoint returns as one JSON array without `alt=sse`."""
        return [self._chunk(b, [{"text": t}]) for t in b.tokens] + [self._last(b)]

    def head(self, b: Behaviour, model: str) -> list[bytes]:
        return []

    def token(self, b: Behaviour, text: str, model: str) -> bytes:
        # Usage in intermediate chunks carries only the prompt count, as the real API's does.
        return _sse(self._chunk(b, [{"text": text}]), eol=self.eol)

    def tail(self, b: Behaviour, model: str) -> list[bytes]:
        return [_sse(self._last(b), eol=self.eol)]

    def reasoning(self, b: Behaviour, model: str) -> list[bytes]:
        # Thought summaries, as `includeThoughts` asks for them; the signature comes on a later part.
        return [_sse(self._chunk(b, [{"text": t, "thought": True}]), eol=self.eol) for t in b.reasoning]

    def calls(self, b: Behaviour, model: str) -> list[bytes]:
        # Each call whole, in a chunk of its own, without an id; the first carries the answer's signature.
        out: list[bytes] = []
        for index, call in enumerate(b.tool_calls):
            part: dict[str, Any] = {"functionCall": {"name": call.name, "args": orjson.loads(call.whole)}}
            if index == 0 and b.signature is not None:
                part["thoughtSignature"] = b.signature
            out.append(_sse(self._chunk(b, [part]), eol=self.eol))
        return out

    @staticmethod
    def answered(body: Any) -> bool:
        contents = body.get("contents") if isinstance(body, dict) else None
        if not isinstance(contents, list) or not contents or not isinstance(contents[-1], dict):
            return False
        parts = contents[-1].get("parts")
        return isinstance(parts, list) and any(isinstance(p, dict) and "functionResponse" in p for p in parts)

    def malformed(self) -> bytes:
        return b'data: {"candidates": [\r\n\r\n'

    def stream_error(self) -> bytes:
        error = {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}
        return _sse({"error": error}, eol=self.eol)

    def reject(self, kind: Reject, b: Behaviour, rec: RecordedRequest) -> web.Response:
        def err(code: int, status: str, message: str, *details: dict[str, Any]) -> web.Response:
            body = {"error": {"code": code, "message": message, "status": status, "details": list(details)}}
            return _json_response(code, body)

        def violation(quota_id: str) -> dict[str, Any]:
            metric = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
            return {"quotaMetric": metric, "quotaId": quota_id, "quotaDimensions": {"model": rec.model}}

        retry = {"@type": _GOOGLE_RPC + "RetryInfo", "retryDelay": f"{b.retry_after or '0'}s"}
        per_minute = violation("GenerateRequestsPerMinutePerProjectPerModel-FreeTier")
        if kind == "rate_limit":
            failure = {"@type": _GOOGLE_RPC + "QuotaFailure", "violations": [per_minute]}
            return err(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", failure, retry)
        if kind == "quota":
            # The trap: a per-day quota answer also carries a RetryInfo of a few seconds.
            per_day = violation("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
            failure = {"@type": _GOOGLE_RPC + "QuotaFailure", "violations": [per_minute, per_day]}
            return err(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", failure, retry)
        if kind == "auth":
            info = {"@type": _GOOGLE_RPC + "ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}
            return err(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", info)
        if kind == "bad_request":
            return err(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        if kind == "not_found":
            return err(404, "NOT_FOUND", f"models/{rec.model} is not found for API version v1beta")
        if kind == "overloaded":
            return err(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        if kind == "server_error":
            return err(500, "INTERNAL", "An internal error has occurred.")
        return _html_response()


_Wire = _OpenAIWire | _ResponsesWire | _AnthropicWire | _GeminiWire


def _split_point(data: bytes) -> int:
    # Just after the lead byte of the first multi-byte character: neither half decodes on its own.
    for i, byte in enumerate(data):
        if byte >= 0x80:
            return i + 1
    return len(data) // 2


def _interruption(wire: _Wire, b: Behaviour, sent: int) -> _Step | None:
    if b.cut_after == sent:
        return _Step("cut")
    if b.end_after == sent:
        return _Step("end")
    if b.malformed_after == sent:
        return _Step("write", wire.malformed())
    if b.error_after == sent:
        return _Step("write", wire.stream_error())
    return None


def _script(wire: _Wire, b: Behaviour, model: str) -> list[_Step]:
    """Everything one streamed response does, in order."""
    steps = [_Step("write", chunk) for chunk in wire.head(b, model)]
    if b.first_token_delay_s > 0:
        steps.append(_Step("sleep", seconds=b.first_token_delay_s))
    steps.extend(_Step("write", chunk) for chunk in wire.reasoning(b, model))
    for sent, token in enumerate(b.tokens):
        if (stop := _interruption(wire, b, sent)) is not None:
            return [*steps, stop]
        if sent and b.pace_s > 0:
            steps.append(_Step("sleep", seconds=b.pace_s))
        steps.append(_Step("split" if b.split_utf8 else "write", wire.token(b, token, model)))
    if (stop := _interruption(wire, b, len(b.tokens))) is not None:
        return [*steps, stop]
    steps.extend(_Step("write", chunk) for chunk in wire.calls(b, model))
    return steps + [_Step("write", chunk) for chunk in wire.tail(b, model)]


class FakeProviders:
    """The fake server. Use `async with FakeProviders() as fake`, or mount `fake.app` yourself and set `fake.root`."""

    def __init__(self, behaviours: Mapping[str, Behaviour] | None = None, *, default: Behaviour | None = None) -> None:
        self.behaviours: dict[str, Behaviour] = {**PRESETS, **(behaviours or {})}
        self.default = default or PRESETS["normal"]  # for model names not in `behaviours`
        self.requests: list[RecordedRequest] = []
        self.root = ""  # "http://127.0.0.1:<port>", set by start()
        self._attempts: Counter[tuple[str, str]] = Counter()
        self._streaming: set[asyncio.Task[Any]] = set()
        self._server: TestServer | None = None
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._openai)
        self.app.router.add_post("/v1/responses", self._responses)
        self.app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure)
        self.app.router.add_post("/v1/messages", self._anthropic)
        self.app.router.add_post("/v1beta/models/{target}", self._gemini)
        self.app.on_shutdown.append(self._on_shutdown)

    async def start(self) -> str:
        """Listen on a free loopback port; returns the server root."""
        self._server = TestServer(self.app, host="127.0.0.1")
        await self._server.start_server()
        self.root = str(self._server.make_url("")).rstrip("/")
        return self.root

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    async def __aenter__(self) -> FakeProviders:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def base_url(self, provider: ProviderName) -> str:
        """What to put in ProviderConfig.base_url: OpenAI's includes /v1, the others (Azure's resource root too) are
        the server root."""
        return f"{self.root}/v1" if provider in ("openai", "openai-responses") else self.root

    def provider_keys(self) -> ProviderKeys:
        """Keys pointing every built-in provider at this server, as a worker's environment would."""
        return ProviderKeys(
            openai_api_key=TEST_API_KEY,
            openai_base_url=self.base_url("openai"),
            anthropic_api_key=TEST_API_KEY,
            anthropic_base_url=self.base_url("anthropic"),
            gemini_api_key=TEST_API_KEY,
            gemini_base_url=self.base_url("gemini"),
        )

    def config(self, provider: ProviderName, **overrides: Any) -> ProviderConfig:
        settings: dict[str, Any] = {"api_key": TEST_API_KEY, "base_url": self.base_url(provider)}
        settings.update(overrides)
        return ProviderConfig(**settings)

    def requests_for(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.model == model]

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._serve(request, _OpenAIWire(), str(body.get("model", "")), body)

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        # The deployment in the path is the model: Azure goes by it, whatever the body says.
        body = await self._body(request)
        return await self._serve(request, _AzureWire(), request.match_info["deployment"], body)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._serve(request, _ResponsesWire(), str(body.get("model", "")), body)

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._serve(request, _AnthropicWire(), str(body.get("model", "")), body)

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["target"].partition(":")
        if method != "streamGenerateContent":
            raise web.HTTPNotFound()
        return await self._serve(request, _GeminiWire(), model, await self._body(request))

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise web.HTTPBadRequest(text="body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body is not a JSON object")
        return body

    async def _serve(self, request: web.Request, wire: _Wire, model: str, body: Any) -> web.StreamResponse:
        b = self.behaviours.get(model, self.default)
        if b.tool_calls and wire.answered(body):
            b = replace(b, tool_calls=(), reasoning=())  # the turn that brings the results gets the final answer
        elif b.tool_calls:
            b = replace(b, tokens=b.call_text, finish_reason="tool_calls")
        self._attempts[(wire.provider, model)] += 1
        rec = RecordedRequest(
            provider=wire.provider,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            model=model,
            attempt=self._attempts[(wire.provider, model)],
        )
        self.requests.append(rec)
        if b.reject is not None and (b.reject_times is None or rec.attempt <= b.reject_times):
            rec.completed = True
            return wire.reject(b.reject, b, rec)
        if isinstance(wire, _GeminiWire) and request.query.get("alt") != "sse":
            rec.completed = True
            return _json_response(200, wire.chunks(b))
        if b.head_delay_s > 0:
            try:
                await self._sleep(request, b.head_delay_s)
            except ConnectionResetError:
                rec.disconnected.set()
                raise
        return await self._stream(request, rec, _script(wire, b, model))

    async def _stream(self, request: web.Request, rec: RecordedRequest, steps: list[_Step]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        task = asyncio.current_task()
        assert task is not None
        self._streaming.add(task)
        try:
            await resp.prepare(request)
            for step in steps:
                await self._run(request, resp, step)
            await resp.write_eof()
            rec.completed = True
        except _Cut:
            assert request.transport is not None
            request.transport.close()  # after what was written so far is flushed, like a dropped upstream
        except ConnectionResetError:
            rec.disconnected.set()
        except asyncio.CancelledError:
            # aiohttp cancels a handler whose client went away; a cancel with the client still there is a shutdown.
            if request.transport is None or request.transport.is_closing():
                rec.disconnected.set()
            raise
        finally:
            self._streaming.discard(task)
        return resp

    async def _run(self, request: web.Request, resp: web.StreamResponse, step: _Step) -> None:
        if step.kind == "write":
            await resp.write(step.data)
        elif step.kind == "split":
            cut = _split_point(step.data)
            await resp.write(step.data[:cut])
            await self._sleep(request, SPLIT_PAUSE_S)
            await resp.write(step.data[cut:])
        elif step.kind == "sleep":
            await self._sleep(request, step.seconds)
        elif step.kind == "cut":
            raise _Cut
        # "end": nothing more to write; the response ends normally.

    @staticmethod
    async def _sleep(request: web.Request, seconds: float) -> None:
        # Sleep in slices so a client that leaves is noticed now, not at the next write.
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("client went away")
            await asyncio.sleep(min(_POLL_S, left))
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("client went away")

    async def _on_shutdown(self, app: web.Application) -> None:
        # Streams still sleeping (slow, or abandoned by a failed test) would hold the shutdown for its full timeout.
        for task in list(self._streaming):
            task.cancel()
