"""The Vercel AI SDK's chat protocol (UI message stream v1) on the hub, so `useChat` and its transports reach any
provider through it unchanged: `POST /v1/ai-sdk/chat`, `GET /v1/ai-sdk/chat/{chatId}/stream` (what
`useChat({resume: true})` asks on page load) and `POST /v1/ai-sdk/chat/{chatId}/stop`.

A chat's running answer is a generation whose channel is named after the chat (`aichat:<chatId>`): any node finds it
without another key, streams it from its start, and knows it has ended when the channel is closed. A new message
deletes the ended channel of the answer before it (the client holds that answer) and takes the name again. Dropping
the connection never cancels; `stop` does.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from .appkeys import AUTH, BACKEND, JOBS, SETTINGS
from .channels import channel_ok
from .errors import ApiError
from .formats import count, event_data, json_response, provider_model, text_of
from .generations import cancelled_if_refused, reachable_record, start_translated
from .operations import refuse_when_draining
from .ownership import reached_as
from .stream import stream_channel
from .transcode import Transcoding, encode_safely

__all__ = ["routes"]

routes = web.RouteTableDef()

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
_STOP_WAITS = 60  # x 50 ms: how long a stop waits for a queued answer to begin
_PASSED = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort", "params")
_FIELDS = frozenset({"id", "messages", "trigger", "messageId", "provider", "model", "metadata", *_PASSED})
_FORMAT = "ai-sdk"  # a chat's streams all read its channel alike: one encoder per node serves them
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool-calls", "content_filter": "content-filter"}


def _new_chat_id() -> str:
    return "run_" + secrets.token_hex(12)


def _channel(chat_id: Any, max_len: int) -> str:
    if not isinstance(chat_id, str) or not channel_ok(f"aichat:{chat_id}", max_len):
        raise ApiError(400, "invalid_body", "id (the chat's) must be 1-190 characters of A-Z a-z 0-9 _ . : @ -")
    return f"aichat:{chat_id}"


# -- UI messages in ----------------------------------------------------------------------------------------------------


def _file(part: Mapping[str, Any]) -> dict[str, Any]:
    media = str(part.get("mediaType") or "")
    if media.startswith("image/"):
        return {"type": "image_url", "image_url": {"url": part.get("url")}}
    file = {"file_data": part.get("url")} | ({"filename": part["filename"]} if part.get("filename") else {})
    return {"type": "file", "file": file}


def _user(message: Mapping[str, Any]) -> dict[str, Any]:
    parts: list[Any] = []
    for part in message.get("parts") or ():
        if isinstance(part, dict) and part.get("type") == "text":
            parts.append({"type": "text", "text": part.get("text")})
        elif isinstance(part, dict) and part.get("type") == "file":
            parts.append(_file(part))
    role = "system" if message.get("role") == "system" else "user"
    return {"role": role, "content": parts}


class _Turns:
    """An assistant UI message as the generation's messages: its steps' text and calls, each call's result after."""

    def __init__(self) -> None:
        self.out: list[dict[str, Any]] = []
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[dict[str, Any]] = []
        self._results: list[dict[str, Any]] = []

    def text(self, text: Any, *, reasoning: bool = False) -> None:
        if self._results:
            self.flush()  # a later step: its own assistant message, after the results of the one before
        (self._reasoning if reasoning else self._text).append(text if isinstance(text, str) else "")

    def call(self, part: Mapping[str, Any], name: str) -> None:
        call_id = part.get("toolCallId")
        arguments = orjson.dumps(part.get("input") if part.get("input") is not None else {}).decode()
        self._calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        state = part.get("state")
        if state == "output-available":
            output = part.get("output")
            content = output if isinstance(output, str) else orjson.dumps(output).decode()
            self._results.append({"role": "tool", "tool_call_id": call_id, "content": content})
        elif state in ("output-error", "output-denied"):
            why = part.get("errorText") if state == "output-error" else "the user denied this call"
            self._results.append({"role": "tool", "tool_call_id": call_id, "content": str(why or "error")})

    def flush(self) -> None:
        if self._text or self._calls or self._reasoning:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self._text)}
            if self._calls:
                message["tool_calls"] = self._calls
            if self._reasoning:
                message["reasoning"] = "".join(self._reasoning)
            self.out.append(message)
        self.out.extend(self._results)
        self._text, self._reasoning, self._calls, self._results = [], [], [], []


def _assistant(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    turns = _Turns()
    for part in message.get("parts") or ():
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            continue
        if kind in ("text", "reasoning"):
            turns.text(part.get("text"), reasoning=kind == "reasoning")
        elif kind == "step-start" and turns._results:
            turns.flush()
        elif kind.startswith("tool-") or kind == "dynamic-tool":
            name = str(part.get("toolName") or "") if kind == "dynamic-tool" else kind.removeprefix("tool-")
            turns.call(part, name)
    turns.flush()
    return turns.out


def _messages(ui: Any) -> Any:
    if not isinstance(ui, list):
        raise ApiError(400, "invalid_messages", "messages must be an array of UI messages")
    out: list[Any] = []
    for message in ui:
        if not isinstance(message, dict):
            raise ApiError(400, "invalid_messages", "each message must be an object")
        out.extend(_assistant(message) if message.get("role") == "assistant" else [_user(message)])
    return out


def _generation(body: Any, kinds: Mapping[str, str], default: str, *, channel: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    provider, model = body.get("provider"), body.get("model")
    if provider is None:
        provider, model = provider_model(model, kinds, default)
    job: dict[str, Any] = {"provider": provider, "model": model, "messages": _messages(body.get("messages"))}
    job.update({k: body[k] for k in _PASSED if body.get(k) is not None})
    job["channel"] = channel
    # The chat's own page is gone while the user is away, or comes back to resume: the answer goes on regardless.
    job["cancel_if_unwatched_s"] = None
    return job


# -- UI message chunks out ---------------------------------------------------------------------------------------------


def _chunk(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Chunks:
    """A generation's channel as UI message chunks, from its start: the whole current message, then live. Each unit
    (hub.transcode) is one chunk, which WorkflowChatTransport's `startIndex` counts; `data: [DONE]` is no chunk, and
    goes with the last."""

    def __init__(self) -> None:
        self._open: tuple[str, str] | None = None  # (kind "text" | "reasoning", part id)
        self._parts = 0
        self._calls: dict[int, tuple[str, str]] = {}  # channel call index -> (toolCallId, toolName)
        self._over = False

    def encode(self, kind: str, raw: str) -> list[bytes]:
        if self._over:
            return []
        data = event_data(raw)
        if kind == "start":
            message_id = "msg_" + (text_of(data, "id").removeprefix("gen_") or "0")
            return [_chunk({"type": "start", "messageId": message_id}), _chunk({"type": "start-step"})]
        if kind in ("token", "refusal", "reasoning"):
            part = "reasoning" if kind == "reasoning" else "text"
            out = self._switch(part)
            assert self._open is not None
            return [*out, _chunk({"type": f"{part}-delta", "id": self._open[1], "delta": text_of(data)})]
        if kind == "tool_call_delta":
            return self._call_delta(data)
        if kind == "tool_call":
            return self._call_done(data)
        if kind == "done":
            return self._done(data)
        if kind in ("error", "reset"):
            text = text_of(data, "message") if kind == "error" else "the answer was restarted after a worker failed"
            return self._end([{"type": "error", "errorText": text or "the generation failed"}])
        return []

    def cut(self) -> bytes:
        """Ended before the answer did (the node is draining): said as a comment, not as a chunk. A chunk would be
        counted by WorkflowChatTransport, whose resume (`startIndex`) would then skip a real one; and a `finish` or
        `abort` would tell it the answer is over. It reconnects because no `finish` came; `useChat` resumes with the
        chat's stream."""
        return b"" if self._over else b": interrupted: resume the chat's stream\n\n"

    def _switch(self, part: str) -> list[bytes]:
        if self._open is not None and self._open[0] == part:
            return []
        out = self._close()
        self._parts += 1
        self._open = (part, f"{part}-{self._parts}")
        return [*out, _chunk({"type": f"{part}-start", "id": self._open[1]})]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        part, pid = self._open
        self._open = None
        return [_chunk({"type": f"{part}-end", "id": pid})]

    def _call_delta(self, data: dict[str, Any]) -> list[bytes]:
        index = count(data, "index")
        out: list[bytes] = []
        if index not in self._calls:
            out = self._close()
            self._calls[index] = call_id, name = text_of(data, "id"), text_of(data, "name")
            out.append(_chunk({"type": "tool-input-start", "toolCallId": call_id, "toolName": name}))
        fragment = text_of(data, "arguments")
        if fragment:
            delta = {"type": "tool-input-delta", "toolCallId": self._calls[index][0], "inputTextDelta": fragment}
            out.append(_chunk(delta))
        return out

    def _call_done(self, data: dict[str, Any]) -> list[bytes]:
        call_id, name = text_of(data, "id"), text_of(data, "name")
        try:
            arguments = orjson.loads(text_of(data, "arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
        chunk = {"type": "tool-input-available", "toolCallId": call_id, "toolName": name, "input": arguments}
        return [*self._close(), _chunk(chunk)]

    def _done(self, data: dict[str, Any]) -> list[bytes]:
        reason = text_of(data, "finish_reason")
        if reason in ("cancelled", "unwatched"):
            # Stopped: `abort`, never `error`, so the chat returns to ready; then `finish`, without which a
            # WorkflowChatTransport would reconnect for ever.
            return self._end([{"type": "abort"}, {"type": "finish", "finishReason": "other"}])
        return self._end([{"type": "finish-step"}, {"type": "finish", "finishReason": _FINISH.get(reason, "other")}])

    def _end(self, chunks: list[dict[str, Any]]) -> list[bytes]:
        self._over = True
        out = [*self._close(), *(_chunk(c) for c in chunks)]
        out[-1] += b"data: [DONE]\n\n"
        return out


# -- the routes --------------------------------------------------------------------------------------------------------


async def _clear_ended(request: web.Request, channel: str) -> None:
    """The chat's previous answer has ended (its channel is closed): delete it, so the new one can take the name. A
    running one stays, and the new message is a 409."""
    backend = request.app[BACKEND]
    info = await backend.info(channel)
    if info is None or not info.closed:
        return
    principal = request.app[AUTH].require(request, "publish", channel)
    owner = await reached_as(request, principal, "publish", channel)
    if owner is not False:
        await backend.delete(channel, owner=owner)


@routes.post("/v1/ai-sdk/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    refuse_when_draining(request)
    request.app[AUTH].authenticate(request)
    settings = request.app[SETTINGS]
    # The chat id decides the channel: read the body once here (start_generation reads it again from aiohttp's
    # buffer), to clear the previous answer first.
    try:
        peek = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    # WorkflowChatTransport sends no chat id: the hub makes one, the run id it reconnects with.
    chat_id = peek.get("id", _new_chat_id()) if isinstance(peek, dict) else None
    channel = _channel(chat_id, settings.max_channel_len)
    await _clear_ended(request, channel)

    try:
        translation = functools.partial(_generation, channel=channel)
        job, principal, _ = await start_translated(request, translation, json_as_text=True)
    except ApiError as e:
        if e.code == "channel_exists":
            raise ApiError(409, "chat_busy", "an answer is still running in this chat: stop it, or wait") from None
        raise
    headers = {**HEADERS, "X-Generation-Id": job.id, "x-workflow-run-id": channel.removeprefix("aichat:")}
    async with cancelled_if_refused(request, job):
        transcoding = Transcoding(_Chunks(), _FORMAT)
        return await stream_channel(request, job.channel, "0", principal, transcoder=transcoding, headers=headers)


def _start_index(request: web.Request) -> int | None:
    raw = request.query.get("startIndex")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "invalid_params", "startIndex must be an integer (negative: from the tail)") from None


async def _chunks_so_far(request: web.Request, channel: str) -> int:
    """How many chunks the channel's events make now: where the tail of a `startIndex` below 0 is."""
    counter, position, chunks = _Chunks(), "0", 0
    while True:
        page = await request.app[BACKEND].range(channel, position, limit=request.app[SETTINGS].replay_page)
        chunks += sum(len(encode_safely(counter, entry.event, entry.data)) for entry in page.entries)
        if not page.more or not page.entries:
            return chunks
        position = page.entries[-1].id


@routes.get("/v1/ai-sdk/chat/{chatId}/stream")
async def resume(request: web.Request) -> web.StreamResponse:
    """`useChat({resume: true})`: the running answer from its start, or 204. `?startIndex=N` (WorkflowChatTransport):
    the chunks after the first N of the chat's latest answer, running or ended; below 0, from the tail."""
    refuse_when_draining(request)
    channel = _channel(request.match_info["chatId"], request.app[SETTINGS].max_channel_len)
    principal = request.app[AUTH].require(request, "subscribe", channel)
    start_index = _start_index(request)
    info = await request.app[BACKEND].info(channel)
    if info is None or (info.closed and start_index is None):
        return web.Response(status=204)  # nothing running in this chat: useChat keeps what it has
    headers = dict(HEADERS)
    skip = start_index or 0
    if skip < 0:
        tail = await _chunks_so_far(request, channel)
        headers["x-workflow-stream-tail-index"] = str(tail - 1)
        skip = max(0, tail + skip)
    transcoding = Transcoding(_Chunks(), _FORMAT, skip)
    return await stream_channel(
        request, channel, "0", principal, check_owner=True, transcoder=transcoding, headers=headers
    )


@routes.post("/v1/ai-sdk/chat/{chatId}/stop")
async def stop(request: web.Request) -> web.Response:
    channel = _channel(request.match_info["chatId"], request.app[SETTINGS].max_channel_len)
    info = await request.app[BACKEND].info(channel)
    generation = None
    for _ in range(_STOP_WAITS if info is not None and not info.closed else 0):
        # The answer's first event names its generation; a job still queued has written none yet.
        first = (await request.app[BACKEND].range(channel, "0", limit=1)).entries
        if first:
            generation = event_data(first[0].data).get("id") if first[0].event == "start" else None
            break
        await asyncio.sleep(0.05)
    if not isinstance(generation, str):
        raise ApiError(404, "chat_not_found", "nothing is running in this chat")
    record = await reachable_record(request, generation, "publish")
    await request.app[JOBS].request_cancel(record.id)
    return json_response({"id": record.id, "status": record.status, "cancel_requested": True}, status=202)
