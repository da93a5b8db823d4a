"""HTTP handlers: validate, call the backend or the fan-out, respond. No Redis command is issued here."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ssecore.backend import ZERO_ID, BackendUnavailable, Idempotency, NewEvent, RangeResult, check_position, parse_id
from ssecore.sse import comment, encode_event, event_id, retry

from .appkeys import AUTH, BACKEND, FANOUT, LIMITS, METRICS, SETTINGS, STATE
from .auth import Principal, seconds_left
from .errors import ApiError
from .fanout import Fanout, Replayed, Subscriber, encode_reset
from .handover import hand_over
from .jsonbody import parse_json
from .limits import Limits
from .ownership import HIDDEN_CHANNEL, channel_reachable, reached_as, stream_access
from .settings import HubSettings

__all__ = ["channel_ok", "routes", "stream_channel"]

log = logging.getLogger(__name__)

# No "/", "%", "..." tricks can pass: the characters allowed cannot spell a path or an escape.
CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
_CHANNEL_RULE = 'channel names are 1-{n} characters of A-Z a-z 0-9 _ . : @ - (not ".", no "..")'


def channel_ok(name: str, max_len: int = 200) -> bool:
    # "." and anything with ".." are path segments to every URL normalizer between a client and us: refused.
    return len(name) <= max_len and CHANNEL_RE.fullmatch(name) is not None and name != "." and ".." not in name


EVENT_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_EVENT_FIELDS = frozenset({"event", "data", "close"})
# Event names the hub itself sends; a publisher must not be able to imitate them.
RESERVED_EVENTS = frozenset({"reset"})
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

routes = web.RouteTableDef()


def _channel(request: web.Request) -> str:
    name = request.match_info["channel"]
    max_len = request.app[SETTINGS].max_channel_len
    if not channel_ok(name, max_len):
        raise ApiError(400, "invalid_channel", _CHANNEL_RULE.format(n=max_len))
    return name


async def read_body(request: web.Request, settings: HubSettings) -> bytes:
    """The request body, within --body-timeout: a body that never finishes must not hold a handler for ever."""
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"the body did not arrive within {settings.body_timeout_s:g} s",
            {"Connection": "close"},
        ) from None


def _draining(request: web.Request) -> None:
    if request.app[STATE].draining:
        raise ApiError(503, "draining", "this node is shutting down; retry on another", {"Retry-After": "1"})


# -- publish --------------------------------------------------------------------------------------------------------


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
    channel = _channel(request)
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


# -- subscribe ------------------------------------------------------------------------------------------------------


def _requested_position(request: web.Request) -> str | None:
    value = request.headers.get("Last-Event-ID", "").strip()
    if not value and request.query_string:  # parsing an empty query would still cache an object per stream
        value = request.query.get("last_event_id", "").strip()
    if not value:
        return None
    parse_id(value)  # InvalidPosition -> 400
    return value


# No HEAD: a stream has no end to stop at, and writing events after a HEAD response would corrupt the connection.
@routes.get("/v1/channels/{channel}/events", allow_head=False)
async def subscribe(request: web.Request) -> web.StreamResponse:
    channel = _channel(request)
    principal = request.app[AUTH].require(request, "subscribe", channel)
    _draining(request)
    position = _requested_position(request)
    return await stream_channel(request, channel, position, principal, check_owner=True)


async def _start(
    request: web.Request, channel: str, position: str | None
) -> tuple[str, RangeResult | None, bytes, bool] | None:
    """Where the stream starts: (position, the first history page if one was read, the preamble, whether the store
    was seen to hold the stream); None when the client already has the channel's end marker (answer 204, which tells
    EventSource to stop reconnecting)."""
    settings = request.app[SETTINGS]
    fanout = request.app[FANOUT]
    preamble = retry(settings.retry_ms) + comment("ok")
    if position is None:
        # Live: start after whatever the channel holds now. The client is told that position at once, so a
        # reconnect before the first event resumes from it instead of silently starting from "now" again.
        # A channel this node tails already knows a position that serves (its tail's): no store read.
        live = fanout.live_position(channel)
        existed = False
        if live is None:
            request.app[METRICS].subscribe_reads.inc()
            info = await request.app[BACKEND].info(channel)
            if info is not None and info.closed:
                return None
            live = info.last_id if info is not None else ZERO_ID
            existed = info is not None
        return live, None, preamble + event_id(live), existed
    if fanout.can_resume(channel, position):
        # What the client missed is in this node's window of the channel: `_catch_up` serves it from memory.
        request.app[METRICS].resumes.labels("window").inc()
        return position, None, preamble, False
    request.app[METRICS].resumes.labels("store").inc()
    first = await _history(request, channel, position)
    if first.closed and check_position(position, first) is None and parse_id(position) >= parse_id(first.last_id):
        return None
    return position, first, preamble, first.exists


async def stream_channel(
    request: web.Request, channel: str, position: str | None, principal: Principal, *, check_owner: bool = False
) -> web.StreamResponse:
    """Answer with the channel's SSE stream from `position` (None: live). Validation and authorization by pattern are
    the caller's; with `check_owner`, so is nothing else: another client's generation is streamed as a channel that
    does not exist (see hub.ownership). The stream ends when the principal's token expires (the client reconnects with
    a fresh one)."""
    start = await _start(request, channel, position)
    provisional = None
    if check_owner:
        # After the store was read, so that a stream seen to exist with no owner is known to be no generation's.
        reachable, provisional = await stream_access(request, principal, channel, existed=start is None or start[3])
        if not reachable:
            # Another client's generation: streamed as a channel that does not exist (the same preamble, the same
            # reset for a resume), and nothing ever comes. A refusal would tell the caller the channel is there.
            channel = HIDDEN_CHANNEL
            start = await _start(request, channel, position)
    if start is None:
        return web.Response(status=204)
    position, first, preamble, _ = start
    settings = request.app[SETTINGS]
    fanout = request.app[FANOUT]
    limits = request.app[LIMITS]
    client = limits.client(request, principal)
    limits.open_stream(client, fanout.subscriber_count)
    metrics = request.app[METRICS]
    # One frame for the whole life of the stream: a node holds thousands of these, and each nested coroutine
    # would stay alive (and in memory) as long as the connection does.
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    # The connection ends with the stream (a handed-over stream closes it): `Connection: close` tells the client
    # not to send its next request (the reconnect) on it.
    resp.force_close()
    sub = Subscriber(channel, request.transport, settings.max_buffer_bytes)
    sub.provisional = provisional
    release = _Release(fanout, sub, _schedule_end(sub, seconds_left(principal), settings), limits, client)
    handed_over = False
    try:
        fanout.register(sub)
        metrics.connections_total.inc()
        await resp.prepare(request)
        # Events may be written by the fan-out straight to the transport (see Subscriber): they must be framed the
        # way this response's body is (chunked for HTTP/1.1, raw for HTTP/1.0; never compressed).
        sub.chunked = resp.headers.get("Transfer-Encoding") == "chunked"
        await resp.write(preamble)
        if await _catch_up(request, resp, sub, position, first):
            # Write what the catch-up queued, then hand the live stream over to a minimal protocol (hub.handover):
            # checked and done synchronously, so nothing can be pushed in between.
            while (chunk := sub.take_pending()) is not None:
                await resp.write(chunk)
            if not sub.ended and hand_over(request, sub, release):
                handed_over = True
                return resp
            while (chunk := await sub.next_chunk()) is not None:
                await resp.write(chunk)
    except ConnectionError:
        # The client went away (as early as before the headers were written: a reconnect storm does that), or
        # was cut off as a slow consumer; it resumes from its last id.
        pass
    except BackendUnavailable as e:
        metrics.backend_errors.labels("history").inc()
        log.info("ending stream on %s: %s", channel, e)
    finally:
        if not handed_over:
            release()
    return resp


@dataclass(slots=True, eq=False)
class _Release:
    """What a stream holds, given back when it ends: its place in the fan-out, its end timer, its count in the limits.
    An object rather than a closure: a handed-over stream keeps it for its whole life (see hub.handover), and a node
    holds thousands of them; a closure over these five would be six objects for the garbage collector to walk."""

    fanout: Fanout
    sub: Subscriber
    expiry: asyncio.TimerHandle | None
    limits: Limits
    client: str

    def __call__(self) -> None:
        self.fanout.detach(self.sub)
        if self.expiry is not None:
            self.expiry.cancel()
        self.limits.close_stream(self.client)


def _schedule_end(sub: Subscriber, token_left_s: float | None, settings: HubSettings) -> asyncio.TimerHandle | None:
    """End the stream when its token expires (the client reconnects with a fresh one) or when it reaches the maximum
    connection age, whichever comes first.

    The age is drawn between 80% and 100% of the setting, so streams opened together (after a deploy, a storm) do not
    all end together; an aged-out stream is told to reconnect after a random 25-100% of the retry delay, and through the
    load balancer lands where connections are fewest: that is how a node added by a scale-up gets its share.
    """
    loop = asyncio.get_running_loop()
    age = settings.max_connection_age_s
    if age > 0:
        age_s = age * random.uniform(0.8, 1.0)
        if token_left_s is None or age_s < token_left_s:
            # Not below a quarter of the delay: EventSource keeps the hint for its next attempts, and a reconnect
            # that fails (its node gone) must not be retried at once, again and again.
            return loop.call_later(age_s, _age_out, sub, random.randint(settings.retry_ms // 4, settings.retry_ms))
    return loop.call_later(token_left_s, sub.end) if token_left_s is not None else None


def _age_out(sub: Subscriber, retry_ms: int) -> None:
    sub.push(retry(retry_ms))
    sub.end()


async def _history(request: web.Request, channel: str, position: str) -> RangeResult:
    request.app[METRICS].subscribe_reads.inc()
    return await request.app[BACKEND].range(channel, position, limit=request.app[SETTINGS].replay_page)


async def _catch_up(
    request: web.Request, resp: web.StreamResponse, sub: Subscriber, position: str, r: RangeResult | None
) -> bool:
    """Replay history after `position` until this node's live tail can take over; then attach to it.

    Returns False when the stream is already over (the close marker was replayed).
    """
    fanout = request.app[FANOUT]
    replayed: Replayed | None = None  # the page just written, handed to the fan-out as the channel's window
    while True:
        if r is not None:
            if sub.provisional is not None and r.exists and not await _may_follow(request, sub):
                fanout.park(sub)
                return True  # open and parked: heartbeats, and never an event
            reset = check_position(position, r)
            if reset is not None:
                request.app[METRICS].resets.labels(reset.reason).inc()
                await resp.write(encode_reset(reset))
                position = reset.continue_after
                replayed = None
                r = await _history(request, sub.channel, position)
                continue
            if r.entries:
                chunks = [encode_event(e.id, e.event, e.data) for e in r.entries]
                await resp.write(b"".join(chunks))
                replayed = Replayed(parse_id(position), [e.key for e in r.entries], chunks)
                position = r.entries[-1].id
                if r.entries[-1].close:
                    return False
            elif r.closed and parse_id(position) >= parse_id(r.last_id):
                return False
            if r.more:
                r = await _history(request, sub.channel, position)
                continue
        # Both synchronous: what the window serves is queued before anything the tail dispatches next.
        if fanout.resume(sub, position) or fanout.try_attach(sub, position, replayed):
            return True
        replayed = None
        r = await _history(request, sub.channel, position)
        if not r.entries and check_position(position, r) is None:
            # The node's tail is ahead of the stream itself: entries it read are gone (the stream was lost or
            # recreated). Start the channel afresh; its other streams end and resume with a reset.
            fanout.break_channel(sub.channel, "tail ahead of the stream")


async def _may_follow(request: web.Request, sub: Subscriber) -> bool:
    """Settle a provisional stream (see hub.ownership.stream_access) whose catch-up found the channel written."""
    owner = await request.app[BACKEND].owner(sub.channel)
    if owner is not None and owner != sub.provisional:
        return False
    sub.provisional = None
    return True


# -- channel management ---------------------------------------------------------------------------------------------


@routes.get("/v1/channels/{channel}")
async def channel_info(request: web.Request) -> web.Response:
    channel = _channel(request)
    principal = request.app[AUTH].require(request, "subscribe", channel)
    # Another client's generation's channel is answered as one that does not exist. The owner is asked after the
    # stream was read: a stream with no owner then was no generation's (a name taken in between has an owner by then).
    info = await request.app[BACKEND].info(channel)
    if info is None or not await channel_reachable(request, principal, "subscribe", channel):
        raise ApiError(404, "channel_not_found", "no such channel")
    body = {"length": info.length, "first_id": info.first_id, "last_id": info.last_id, "closed": info.closed}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


@routes.delete("/v1/channels/{channel}")
async def channel_delete(request: web.Request) -> web.Response:
    channel = _channel(request)
    principal = request.app[AUTH].require(request, "publish", channel)
    owner = await reached_as(request, principal, "publish", channel)
    # Deleted only if the owner is still the one the caller was let in for: a generation that took the name after
    # the check is not the caller's to delete, and is answered like no channel.
    if owner is False or not await request.app[BACKEND].delete(channel, owner=owner):
        raise ApiError(404, "channel_not_found", "no such channel")
    return web.Response(status=204)


# -- operations -----------------------------------------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: 503 naming the loop that stopped going round (see ssecore.liveness); a Redis outage is not one."""
    status, body = request.app[METRICS].liveness.report()
    return web.Response(status=status, body=body, content_type="application/json")


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problem = None
    if state.draining:
        problem = "draining"
    else:
        try:
            await request.app[BACKEND].ping()
        except BackendUnavailable:
            problem = "backend_unavailable"
        else:
            if not request.app[FANOUT].healthy:
                problem = "live_tail_failing"
    if problem is not None:
        body = orjson.dumps({"status": "unavailable", "reason": problem})
        return web.Response(status=503, body=body, content_type="application/json")
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
