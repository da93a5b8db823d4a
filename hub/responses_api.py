"""OpenAI's Responses API on the hub, with background mode and resume on any node: `POST /v1/responses`,
`GET /v1/responses/{id}` (`?stream=true&starting_after=N`), `POST /v1/responses/{id}/cancel`.

A response is a generation (`resp_<x>` is `gen_<x>`): the same job, worker, channel and cancel. Its events are a
function of the channel alone: `_Events` reads the channel from its start and numbers what it writes 0, 1, ..., so
every node derives the same `sequence_number`s, and `starting_after=N` is exact wherever it is asked, for as long as
the channel is kept. The channel's own events map as: `start` to `response.created` and `response.in_progress`;
`reasoning` to a reasoning item's summary; `token` to a message item's `output_text`; `refusal` to a message's
refusal part; `tool_call_delta`/`tool_call` to a `function_call` item's arguments; `done` to `response.completed`
(`response.incomplete` for a cut or filtered answer, or a cancelled one), `error` to `response.failed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ssecore.jobs import TERMINAL_STATUSES, GenerationRecord, Job

from .appkeys import AUTH, JOBS
from .auth import Principal
from .errors import OPENAI_ERRORS, ApiError
from .formats import NOWHERE, count, event_data, json_response, provider_model, text_of
from .generations import cancelled_if_refused, reachable_record, start_translated
from .operations import refuse_when_draining
from .stream import stream_channel
from .transcode import Transcoding

__all__ = ["routes"]

routes = web.RouteTableDef()

_FIELDS = frozenset(
    {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning"}
    | {"max_output_tokens", "temperature", "top_p", "stream", "background"}
)
_IGNORED = frozenset({"store", "metadata", "user", "include", "truncation", "service_tier", "stream_options"})
_STATUS = {"queued": "queued", "running": "in_progress", "done": "completed", "error": "failed"}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_id(generation_id: str) -> str:
    return "resp_" + generation_id.removeprefix("gen_")


def _generation_id(rid: str) -> str:
    return "gen_" + rid.removeprefix("resp_")


# -- the request ------------------------------------------------------------------------------------------------------


def _part(part: Any) -> Any:
    """An input content part as a generation's message part."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "input_image":
        return {"type": "image_url", "image_url": {"url": part.get("image_url")}}
    if kind == "input_file":
        file = {"file_data": part.get("file_data")} | ({"filename": part["filename"]} if "filename" in part else {})
        return {"type": "file", "file": file}
    return part  # refused by the generation's checks, naming it


def _messages(items: Any, instructions: Any) -> Any:
    """The input items as a generation's messages: calls join the assistant message before them, outputs become
    tool messages."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise ApiError(400, "invalid_messages", "input must be a string or an array of items")
    out: list[Any] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            content = item.get("content")
            parts = [_part(p) for p in content] if isinstance(content, list) else content
            out.append({"role": item.get("role"), "content": parts})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments")}}  # fmt: skip
            if (
                not out
                or out[-1].get("role") != "assistant"
                or out[-1].get("tool_calls") is None
                and out[-1]["content"]
            ):
                out.append({"role": "assistant", "content": None, "tool_calls": []})
            out[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
        elif kind != "reasoning":  # a reasoning item from an earlier answer: nothing a generation takes
            raise ApiError(400, "unsupported", f"input items of type {kind!r}")
    return out


def _tools(tools: Any) -> Any:
    if not isinstance(tools, list):
        return tools
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ApiError(400, "unsupported", "tools: function tools only")
        fields = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fields})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format(text: Any) -> Any:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return fmt


def _generation(body: Any, kinds: Mapping[str, str], default: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    unknown = set(body) - _FIELDS - _IGNORED
    if unknown:
        raise ApiError(400, "unsupported", f"unrecognized request argument: {', '.join(sorted(unknown))[:200]}")
    provider, model = provider_model(body.get("model"), kinds, default)
    job: dict[str, Any] = {"provider": provider, "model": model}
    job["messages"] = _messages(body.get("input"), body.get("instructions"))
    chat = {
        "tools": _tools(body.get("tools")),
        "tool_choice": _tool_choice(body.get("tool_choice")),
        "parallel_tool_calls": body.get("parallel_tool_calls"),
        "response_format": _format(body.get("text")),
        "reasoning_effort": (body.get("reasoning") or {}).get("effort")
        if isinstance(body.get("reasoning"), dict)
        else None,
    }
    job.update({k: v for k, v in chat.items() if v is not None})
    params = {"max_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature")}
    params["top_p"] = body.get("top_p")
    job["params"] = {k: v for k, v in params.items() if v is not None}
    if body.get("background") is True:
        job["cancel_if_unwatched_s"] = None  # nobody watches a background response: that is the point of it
    return job


# -- the response object ----------------------------------------------------------------------------------------------


def _usage(usage: Any) -> dict[str, Any] | None:
    if usage is None:
        return None
    usage = usage if isinstance(usage, dict) else {}
    i, o = count(usage, "input_tokens"), count(usage, "output_tokens")
    return {
        "input_tokens": i,
        "input_tokens_details": {"cached_tokens": count(usage, "cached_input_tokens")},
        "output_tokens": o,
        "output_tokens_details": {"reasoning_tokens": count(usage, "reasoning_tokens")},
        "total_tokens": i + o,
    }


def _response(
    rid: str,
    created: float,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    *,
    usage: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
    incomplete: str | None = None,
    background: bool = False,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(created),
        "status": status,
        "background": background,
        "model": model,
        "output": output,
        "usage": _usage(usage),
        "error": dict(error) if error else None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


def _items_of(rid: str, message: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """A finished generation's message as output items (for a read of the whole response)."""
    if not message:
        return []
    base = rid.removeprefix("resp_")
    items: list[dict[str, Any]] = []
    if message.get("reasoning"):
        summary = [{"type": "summary_text", "text": message["reasoning"]}]
        items.append({"type": "reasoning", "id": f"rs_{base}_{len(items)}", "summary": summary})
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "output_text", "text": message["content"], "annotations": []})
    if message.get("refusal"):
        content.append({"type": "refusal", "refusal": message["refusal"]})
    if content:
        items.append({"type": "message", "id": f"msg_{base}_{len(items)}", "status": "completed",
                      "role": "assistant", "content": content})  # fmt: skip
    for call in message.get("tool_calls") or ():
        items.append({"type": "function_call", "id": f"fc_{base}_{len(items)}", "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})  # fmt: skip
    return items


def _from_record(record: GenerationRecord) -> dict[str, Any]:
    rid = response_id(record.id)
    status = "cancelled" if record.status == "cancelled" else _STATUS[record.status]
    incomplete = _INCOMPLETE.get(record.finish_reason or "") if record.status == "done" else None
    if incomplete:
        status = "incomplete"
    model, items = f"{record.provider}/{record.model}", _items_of(rid, record.message)
    return _response(
        rid, record.created_at, model, status, items, usage=record.usage, error=record.error, incomplete=incomplete
    )  # fmt: skip


# -- the events -------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    kind: str  # "reasoning", "message", "refusal" (a message of a refusal part), "function_call"
    index: int
    id: str
    text: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""


class _Events:
    """A generation's channel as Responses API events, numbered from 0 at `response.created`: the `sequence_number`
    of each is its index among the units this makes (hub.transcode)."""

    def __init__(self, rid: str, created: float, model: str, background: bool = False) -> None:
        self._rid, self._created, self._model, self._background = rid, created, model, background
        self._seq = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # by the channel's call index
        self._closed: set[str] = set()  # the ids of the items ended
        self._over = False
        self.final: dict[str, Any] | None = None  # the response, once it ended

    def encode(self, kind: str, raw: str) -> list[bytes]:
        if self._over:
            return []
        out: list[bytes] = []
        for name, body in self._map(kind, event_data(raw)):
            out.append(_event(name, self._seq, body))
            self._seq += 1
        return out

    def _response(self, status: str, **kw: Any) -> dict[str, Any]:
        output = [self._whole(i) for i in self._items]
        return _response(self._rid, self._created, self._model, status, output, background=self._background, **kw)

    def _map(self, kind: str, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if kind == "start":
            return [("response.created", {"response": self._response("in_progress")}),
                    ("response.in_progress", {"response": self._response("in_progress")})]  # fmt: skip
        if kind in ("reasoning", "token", "refusal"):
            item_kind = {"reasoning": "reasoning", "token": "message", "refusal": "refusal"}[kind]
            out = self._switch(item_kind)
            assert self._open is not None
            self._open.text.append(text_of(data))
            return out + [self._delta(self._open, text_of(data))]
        if kind == "tool_call_delta":
            return self._call_delta(data)
        if kind == "tool_call":
            call = self._calls.get(count(data, "index"))
            if call is None:
                return []
            call.call_id, call.name = text_of(data, "id") or call.call_id, text_of(data, "name") or call.name
            call.text = [text_of(data, "arguments")] if "arguments" in data else call.text
            return self._close(call)
        if kind == "done":
            return self._end(data)
        if kind == "error":
            return self._failed(text_of(data, "code") or "provider_error", text_of(data, "message"))
        if kind == "reset":
            reason = text_of(data, "reason")
            if reason == "restarted":
                return self._failed("restarted", "the generation was restarted after its worker failed")
            # The hub's own: the channel no longer holds the response whole (trimmed, expired, deleted).
            return self._failed(reason or "reset", "the response's events are no longer kept whole; read it whole")
        return []

    def cut(self) -> bytes:
        """The stream ends before the response did (the node drains, the token expired): say so, as a failure. It is
        no event of the response: it repeats the last number written, so that a client resuming after the highest
        number it saw misses nothing."""
        if self._over:
            return b""
        message = "the stream ended before the response did; read it again from its last sequence_number"
        response = self._response("failed", error={"code": "interrupted", "message": message})
        return _event("response.failed", self._seq - 1, {"response": response})

    def _end(self, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = self._close(self._open)
        out += [e for c in list(self._calls.values()) for e in self._close(c)]
        self._over = True
        reason, usage = text_of(data, "finish_reason"), data.get("usage")
        if reason in ("cancelled", "unwatched"):
            self.final = self._response("cancelled", usage=usage)
            return out + [("response.incomplete", {"response": self.final})]
        if reason in _INCOMPLETE:
            self.final = self._response("incomplete", usage=usage, incomplete=_INCOMPLETE[reason])
            return out + [("response.incomplete", {"response": self.final})]
        self.final = self._response("completed", usage=usage)
        return out + [("response.completed", {"response": self.final})]

    def _failed(self, code: str, message: str) -> list[tuple[str, dict[str, Any]]]:
        self._over = True
        self.final = self._response("failed", error={"code": code, "message": message or "the generation failed"})
        return [("response.failed", {"response": self.final})]

    def _switch(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        if self._open is not None and self._open.kind == kind:
            return []
        out = self._close(self._open)
        item = self._add(kind)
        self._open = item
        return out + self._opening(item)

    def _add(self, kind: str, call_id: str = "", name: str = "") -> _Item:
        prefix = {"reasoning": "rs", "message": "msg", "refusal": "msg", "function_call": "fc"}[kind]
        index = len(self._items)
        item = _Item(kind, index, f"{prefix}_{self._rid.removeprefix('resp_')}_{index}", call_id=call_id, name=name)
        self._items.append(item)
        return item

    def _opening(self, item: _Item) -> list[tuple[str, dict[str, Any]]]:
        added = ("response.output_item.added", {"output_index": item.index, "item": self._whole(item, "in_progress")})
        where = {"item_id": item.id, "output_index": item.index}
        part: dict[str, Any]
        if item.kind == "reasoning":
            part = {"type": "summary_text", "text": ""}
            return [added, ("response.reasoning_summary_part.added", {**where, "summary_index": 0, "part": part})]
        if item.kind in ("message", "refusal"):
            part = {"type": "output_text", "text": "", "annotations": []} if item.kind == "message" else {
                "type": "refusal", "refusal": ""}  # fmt: skip
            return [added, ("response.content_part.added", {**where, "content_index": 0, "part": part})]
        return [added]

    def _delta(self, item: _Item, text: str) -> tuple[str, dict[str, Any]]:
        where = {"item_id": item.id, "output_index": item.index}
        if item.kind == "reasoning":
            return "response.reasoning_summary_text.delta", {**where, "summary_index": 0, "delta": text}
        if item.kind == "message":
            return "response.output_text.delta", {**where, "content_index": 0, "delta": text, "logprobs": []}
        if item.kind == "refusal":
            return "response.refusal.delta", {**where, "content_index": 0, "delta": text}
        return "response.function_call_arguments.delta", {**where, "delta": text}

    def _call_delta(self, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        index = count(data, "index")
        out: list[tuple[str, dict[str, Any]]] = []
        call = self._calls.get(index)
        if call is None:
            # Text or reasoning before it is complete; other calls stay open until their own tool_call (a provider
            # may send several at once).
            out = self._close(self._open)
            call = self._calls[index] = self._add("function_call", text_of(data, "id"), text_of(data, "name"))
            out += self._opening(call)
        elif not call.name:
            call.name = text_of(data, "name")  # a server that names a call after its first fragment
        fragment = text_of(data, "arguments")
        call.text.append(fragment)
        return out + ([self._delta(call, fragment)] if fragment else [])

    def _close(self, item: _Item | None) -> list[tuple[str, dict[str, Any]]]:
        if item is None or item.id in self._closed:
            return []
        if self._open is item:
            self._open = None
        where = {"item_id": item.id, "output_index": item.index}
        text = "".join(item.text)
        whole = self._whole(item)
        part: dict[str, Any]
        if item.kind == "function_call":
            out = [("response.function_call_arguments.done", {**where, "arguments": text or "{}"})]
        elif item.kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            out = [("response.reasoning_summary_text.done", {**where, "summary_index": 0, "text": text}),
                   ("response.reasoning_summary_part.done", {**where, "summary_index": 0, "part": part})]  # fmt: skip
        elif item.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            out = [("response.output_text.done", {**where, "content_index": 0, "text": text, "logprobs": []}),
                   ("response.content_part.done", {**where, "content_index": 0, "part": part})]  # fmt: skip
        else:
            part = {"type": "refusal", "refusal": text}
            out = [("response.refusal.done", {**where, "content_index": 0, "refusal": text}),
                   ("response.content_part.done", {**where, "content_index": 0, "part": part})]  # fmt: skip
        self._closed.add(item.id)
        return [*out, ("response.output_item.done", {"output_index": item.index, "item": whole})]

    def _whole(self, item: _Item, status: str = "completed") -> dict[str, Any]:
        text = "".join(item.text) if status == "completed" else ""
        if item.kind == "reasoning":
            return {
                "type": "reasoning",
                "id": item.id,
                "summary": [{"type": "summary_text", "text": text}] if text else [],
            }
        if item.kind == "function_call":
            return {"type": "function_call", "id": item.id, "call_id": item.call_id, "name": item.name,
                    "arguments": text or ("{}" if status == "completed" else ""), "status": status}  # fmt: skip
        part = {"type": "output_text", "text": text, "annotations": []} if item.kind == "message" else {
            "type": "refusal", "refusal": text}  # fmt: skip
        return {"type": "message", "id": item.id, "status": status, "role": "assistant",
                "content": [part] if status == "completed" else []}  # fmt: skip


def _event(name: str, seq: int, body: Mapping[str, Any]) -> bytes:
    payload = orjson.dumps({"type": name, "sequence_number": seq, **body})
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


# -- the routes -------------------------------------------------------------------------------------------------------


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    request[OPENAI_ERRORS] = True
    job, principal, body = await start_translated(request, _generation)
    async with cancelled_if_refused(request, job):
        return await _answer(request, job, principal, body)


async def _answer(request: web.Request, job: Job, principal: Principal, seen: Mapping[str, Any]) -> web.StreamResponse:
    # The model as every node names it: from what the generation keeps.
    rid, model, background = response_id(job.id), f"{job.provider}/{job.model}", seen.get("background") is True
    headers = {"X-Generation-Id": job.id}
    if seen.get("stream") is True:
        events = _Events(rid, job.created_at, model, background=background)
        transcoding = Transcoding(events, ("responses", rid, background))
        return await stream_channel(request, job.channel, "0", principal, transcoder=transcoding, headers=headers)
    if background:
        queued = _response(rid, job.created_at, model, "queued", [], background=True)
        return json_response(queued, headers=headers)
    events = _Events(rid, job.created_at, model)
    await stream_channel(request, job.channel, "0", principal, transcoder=Transcoding(events), into=NOWHERE)
    if events.final is None:
        raise ApiError(503, "unavailable", "the response could not be followed to its end; read it by its id")
    return json_response(events.final, headers=headers)


def _starting_after(request: web.Request) -> int:
    raw = request.query.get("starting_after", "-1")
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_params", "starting_after must be an integer (a sequence_number)") from None
    return max(-1, value)


@routes.get("/v1/responses/{id}")
async def get_response(request: web.Request) -> web.StreamResponse:
    request[OPENAI_ERRORS] = True
    refuse_when_draining(request)
    record = await reachable_record(request, _generation_id(request.match_info["id"]), "subscribe", "publish")
    if request.query.get("stream") == "true":
        principal = request.app[AUTH].authenticate(request)
        rid = response_id(record.id)
        events = _Events(rid, record.created_at, f"{record.provider}/{record.model}")
        # From the channel's start, whatever N: every node numbers the events the same way.
        transcoding = Transcoding(events, ("responses", rid, False), skip=_starting_after(request) + 1)
        return await stream_channel(
            request, record.channel, "0", principal, transcoder=transcoding, check_owner=True
        )  # fmt: skip
    return json_response(_from_record(record))


@routes.post("/v1/responses/{id}/cancel")
async def cancel_response(request: web.Request) -> web.Response:
    request[OPENAI_ERRORS] = True
    record = await reachable_record(request, _generation_id(request.match_info["id"]), "publish")
    if record.status not in TERMINAL_STATUSES:
        await request.app[JOBS].request_cancel(record.id)
    return json_response(_from_record(record))
