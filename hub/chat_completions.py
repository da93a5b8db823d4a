"""OpenAI Chat Completions on the hub (`POST /v1/chat/completions`), so the official OpenAI SDKs reach any provider
through it unchanged. Each request is a generation: the same job, worker, channel and cancel as `POST
/v1/generations`; its id is in the `X-Generation-Id` header.

`model` is `<provider>/<model>` (`anthropic/claude-...`); a name without a known provider before its first `/` is a
model of `--default-provider`. `stream: true` answers in `chat.completion.chunk`s ending with `data: [DONE]`;
otherwise the whole `chat.completion`, once the generation has ended. Errors take OpenAI's shape (hub.errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from ssecore.jobs import Job

from .auth import Principal
from .errors import OPENAI_ERRORS, ApiError
from .formats import NOWHERE, count, event_data, json_response, provider_model, text_of
from .generations import cancelled_if_refused, start_translated
from .stream import stream_channel
from .transcode import Transcoding

__all__ = ["routes"]

routes = web.RouteTableDef()

# Request fields, as the SDK sends them: those a generation takes, and those that change nothing here.
_TAKEN = frozenset({"model", "messages", "tools", "tool_choice", "parallel_tool_calls", "response_format"})
_PARAMS = frozenset({"max_completion_tokens", "max_tokens", "temperature", "top_p", "stop"})
_IGNORED = frozenset({"user", "metadata", "store", "stream", "stream_options", "n", "reasoning_effort"})
# Fields the SDK puts on an assistant message it returned (sent back as it is, in the next request), beside ours.
_ASSISTANT_EXTRAS = frozenset({"annotations", "audio", "function_call"})
# The hub's reasons the API has no word for.
_FINISH = {"cancelled": "stop", "unwatched": "stop"}


def _message(m: Any) -> Any:
    """A message as the SDK sends it back: the fields it adds with null values go, `reasoning_content` (DeepSeek's
    name, which this endpoint streams) is the request's `reasoning`, and the stream helper's own fields on its calls
    (`index`, `parsed_arguments`) go."""
    if not isinstance(m, dict) or m.get("role") != "assistant":
        return m
    out = {k: v for k, v in m.items() if not (v is None and k != "content") and k not in _ASSISTANT_EXTRAS}
    if "reasoning_content" in out:
        out.setdefault("reasoning", out.pop("reasoning_content"))
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_call(c) for c in out["tool_calls"]]
    return out


def _call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    call = {k: v for k, v in call.items() if k != "index"}
    function = call.get("function")
    if isinstance(function, dict) and "parsed_arguments" in function:
        call["function"] = {k: v for k, v in function.items() if k != "parsed_arguments"}
    return call


def _check_n(body: Mapping[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise ApiError(400, "unsupported", "n: one choice per request")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, "unsupported", "stream_options: only include_usage")


def _generation(body: Any, kinds: Mapping[str, str], default: str) -> dict[str, Any]:
    """The generation of a Chat Completions request, in `POST /v1/generations` terms (checked there)."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    unknown = set(body) - _TAKEN - _PARAMS - _IGNORED
    if unknown:
        raise ApiError(400, "unsupported", f"unrecognized request argument: {', '.join(sorted(unknown))[:200]}")
    _check_n(body)
    provider, model = provider_model(body.get("model"), kinds, default)
    job: dict[str, Any] = {"provider": provider, "model": model}
    messages = body.get("messages")
    job["messages"] = [_message(m) for m in messages] if isinstance(messages, list) else messages
    for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort"):
        if body.get(name) is not None:
            job[name] = body[name]
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    params = {"max_tokens": cap, "temperature": body.get("temperature"), "top_p": body.get("top_p")}
    params["stop"] = body.get("stop")
    job["params"] = {k: v for k, v in params.items() if v is not None}
    return job


def _usage(usage: Any) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = count(usage, "input_tokens"), count(usage, "output_tokens")
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if usage.get("reasoning_tokens") is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": count(usage, "reasoning_tokens")}
    if usage.get("cached_input_tokens") is not None:
        out["prompt_tokens_details"] = {"cached_tokens": count(usage, "cached_input_tokens")}
    return out


def _error(data: Mapping[str, Any]) -> dict[str, Any]:
    message, code = text_of(data, "message") or "the generation failed", text_of(data, "code") or None
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


_RESTARTED = {"code": "restarted", "message": "the generation was restarted after a worker failed; ask again"}
_CUT = {
    "code": "interrupted",
    "message": "the stream ended before the generation did; follow it by its X-Generation-Id",
}


class _Chunks:
    """A generation's channel as `chat.completion.chunk`s (stream: true)."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        self._include_usage = include_usage
        self._over = False

    def _chunk(self, delta: Mapping[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return b"data: " + orjson.dumps({**self._head, "choices": [choice]}) + b"\n\n"

    def encode(self, kind: str, raw: str) -> list[bytes]:
        if self._over:
            return []
        data = event_data(raw)
        if kind == "start":
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "token":
            return [self._chunk({"content": text_of(data)})]
        if kind == "reasoning":
            return [self._chunk({"reasoning_content": text_of(data)})]
        if kind == "refusal":
            return [self._chunk({"refusal": text_of(data)})]
        if kind == "tool_call_delta":
            return [self._chunk({"tool_calls": [_tool_call_delta(data)]})]
        if kind == "done":
            return self._done(data)
        if kind in ("error", "reset"):
            # A restarted generation begins its answer again: a client that has half of it cannot be told to drop it.
            self._over = True
            return [b"data: " + orjson.dumps(_error(data if kind == "error" else _RESTARTED)) + b"\n\n"]
        return []  # tool_call (its deltas said it all), and events of the channel's own

    def cut(self) -> bytes:
        return b"" if self._over else b"data: " + orjson.dumps(_error(_CUT)) + b"\n\n"

    def _done(self, data: Mapping[str, Any]) -> list[bytes]:
        self._over = True
        reason = text_of(data, "finish_reason") or "stop"
        out = [self._chunk({}, _FINISH.get(reason, reason))]
        if self._include_usage:
            usage = {**self._head, "choices": [], "usage": _usage(data.get("usage"))}
            out.append(b"data: " + orjson.dumps(usage) + b"\n\n")
        return [*out, b"data: [DONE]\n\n"]


def _tool_call_delta(data: Mapping[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": text_of(data, "arguments")}
    call: dict[str, Any] = {"index": count(data, "index")}
    if "id" in data:
        call["id"], call["type"] = text_of(data, "id"), "function"
    if "name" in data:
        function["name"] = text_of(data, "name")
    call["function"] = function
    return call


class _Collected:
    """The channel's events, for the whole answer of `stream: false`."""

    def __init__(self) -> None:
        self.terminal: tuple[str, str] | None = None  # (kind, data) of the done or error event

    def encode(self, kind: str, raw: str) -> list[bytes]:
        if kind in ("done", "error"):
            self.terminal = kind, raw
        elif kind == "reset":
            self.terminal = None  # a restarted generation: its answer is the one that follows
        return []

    def cut(self) -> bytes:
        return b""


def _completion(head: Mapping[str, Any], done: Mapping[str, Any]) -> dict[str, Any]:
    message = dict(done.get("message") or {"role": "assistant", "content": ""})
    if "reasoning" in message:
        message["reasoning_content"] = message.pop("reasoning")
    message.setdefault("refusal", None)
    reason = text_of(done, "finish_reason") or "stop"
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _FINISH.get(reason, reason)}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(done.get("usage"))}


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    request[OPENAI_ERRORS] = True
    job, principal, body = await start_translated(request, _generation)
    async with cancelled_if_refused(request, job):
        return await _answer(request, job, principal, body)


async def _answer(request: web.Request, job: Job, principal: Principal, body: Mapping[str, Any]) -> web.StreamResponse:
    completion_id, created, model = f"chatcmpl-{job.id}", int(job.created_at), str(body.get("model"))
    headers = {"X-Generation-Id": job.id}
    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        # Its own encoder: nobody else asks for this generation's stream in this form.
        chunks = Transcoding(_Chunks(completion_id, created, model, include_usage))
        return await stream_channel(request, job.channel, "0", principal, transcoder=chunks, headers=headers)
    collected = _Collected()
    await stream_channel(request, job.channel, "0", principal, transcoder=Transcoding(collected), into=NOWHERE)
    head = {"id": completion_id, "created": created, "model": model}
    terminal = collected.terminal
    if terminal is None:
        raise ApiError(503, "unavailable", "the generation could not be followed to its end; read it by its id")
    kind, data = terminal[0], event_data(terminal[1])
    if kind == "error":
        code = text_of(data, "code") or "provider_error"
        # The provider's refusal of the request is the caller's to fix (400); a failure of its own, a 502.
        status = 400 if code == "bad_request" else 502
        raise ApiError(status, code, text_of(data, "message") or "the generation failed")
    return json_response(_completion(head, data), headers=headers)
