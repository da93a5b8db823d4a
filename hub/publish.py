"""Publishing over HTTP (POST /v1/channels/{c}/events): the events of a body checked, an Idempotency-Key honoured,
and the events appended to the channel's stream."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import orjson
from aiohttp import web

from ssecore.backend import BackendUnavailable, Idempotency, NewEvent

from .appkeys import AUTH, BACKEND, LIMITS, METRICS, SETTINGS
from .channels import channel_name
from .errors import ApiError
from .jsonbody import parse_json, read_body
from .settings import HubSettings

__all__ = ["routes"]

EVENT_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_EVENT_FIELDS = frozenset({"event", "data", "close"})
# Event names the hub itself sends; a publisher must not be able to imitate them.
RESERVED_EVENTS = frozenset({"reset"})

routes = web.RouteTableDef()


def _parse_events(body: Any, settings: HubSettings) -> tuple[list[NewEvent], bool]:
    items = body if isinstance(body, list) else [body]
    if not items:
        raise ApiError(400, "invalid_body", "the body is an empty array; send at least one event")
    if len(items) > settings.max_batch:
        raise ApiError(
            413, "max_batch", f"at most {settings.max_batch} events per request", extra={"limit": "max_batch"}
        )
    events: list[NewEvent] = []
    close = False
    last = len(items) - 1
    for i, item in enumerate(items):
        where = f"event {i}" if isinstance(body, list) else "the event"
        if not isinstance(item, dict):
            raise ApiError(400, "invalid_body", f"{where} is not a JSON object")
        unknown = item.keys() - _EVENT_FIELDS
        if unknown:
            raise ApiError(400, "invalid_body", f"{where} has unknown fields: {', '.join(sorted(unknown))[:200]}")
        if "data" not in item:
            raise ApiError(400, "invalid_body", f"{where} has no data")
        name = item.get("event", "message")
        if not isinstance(name, str) or not EVENT_RE.fullmatch(name):
            raise ApiError(400, "invalid_event", f"{where}: event names are 1-64 characters of A-Z a-z 0-9 _ . : -")
        if name in RESERVED_EVENTS:
            raise ApiError(400, "reserved_event", f"{where}: the event name {name!r} is reserved for the hub")
        flag = item.get("close", False)
        if not isinstance(flag, bool):
            raise ApiError(400, "invalid_body", f"{where}: close must be true or false")
        if flag and i != last:
            raise ApiError(400, "invalid_body", f"{where}: only the last event of a body may close the channel")
        close = flag
        data = item["data"]
        try:
            text = data if isinstance(data, str) else orjson.dumps(data).decode()
        except orjson.JSONEncodeError:
            # orjson reads 1024 levels of nesting but writes only 254.
            raise ApiError(400, "invalid_body", f"{where}: data nests arrays and objects too deeply") from None
        if len(text) > settings.max_event_bytes or len(text.encode()) > settings.max_event_bytes:
            raise ApiError(
                413,
                "max_event_bytes",
                f"{where}: data is over {settings.max_event_bytes} bytes",
                extra={"limit": "max_event_bytes"},
            )
        events.append(NewEvent(name, text))
    return events, close


def _body_too_large(settings: HubSettings) -> ApiError:
    return ApiError(413, "body_too_large", f"the body is over the limit of {settings.max_body_bytes} bytes")


@routes.post("/v1/channels/{channel}/events")
async def publish(request: web.Request) -> web.Response:
    channel = channel_name(request)
    principal = request.app[AUTH].require(request, "publish", channel)
    settings = request.app[SETTINGS]
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the events as application/json")
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise _body_too_large(settings)
    raw = await read_body(request, settings)
    if len(raw) > settings.max_body_bytes:  # a body without Content-Length (the app reads up to --max-job-bytes)
        raise _body_too_large(settings)
    body = parse_json(raw)
    events, close = _parse_events(body, settings)
    idempotency = _idempotency(request, events, close)
    request.app[LIMITS].publish(request.app[LIMITS].client(request, principal), len(events), len(raw))
    metrics = request.app[METRICS]
    started = time.perf_counter()
    try:
        if idempotency is None:
            ids = await request.app[BACKEND].append(channel, events, close=close)
        else:
            appended = await request.app[BACKEND].append_once(channel, events, idempotency, close=close)
            ids = appended.ids
            if appended.replayed:
                # The same answer as the first time, so a retry cannot tell the difference, but said in a header.
                metrics.publish_replays.inc()
                body = orjson.dumps({"ids": ids})
                return web.Response(status=201, body=body, content_type="application/json", headers=_REPLAYED)
    except BackendUnavailable:
        metrics.backend_errors.labels("append").inc()
        raise
    metrics.publish_seconds.observe(time.perf_counter() - started)
    metrics.events_published.inc(len(ids))
    return web.Response(status=201, body=orjson.dumps({"ids": ids}), content_type="application/json")


_REPLAYED = {"Idempotent-Replayed": "true"}
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")


def _idempotency(request: web.Request, events: list[NewEvent], close: bool) -> Idempotency | None:
    """The request's Idempotency-Key, with a digest of what it publishes (a key reused for other events is refused)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 visible ASCII characters")
    digest = hashlib.sha256(orjson.dumps([close, [[e.event, e.data] for e in events]])).hexdigest()
    return Idempotency(key, digest[:32])
