"""Subscribing over HTTP (GET /v1/channels/{c}/events): the SSE stream of a channel, from where the client asks,
through the catch-up from history or this node's window to the live feed, until it ends. Also serves generations'
streams (`stream_channel`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from ssecore.backend import ZERO_ID, BackendUnavailable, RangeResult, Reset, check_position, parse_id
from ssecore.sse import comment, encode_event, event_id, retry

from .appkeys import AUTH, BACKEND, FANOUT, LIMITS, METRICS, SETTINGS
from .auth import Principal, seconds_left
from .channels import channel_name
from .fanout import Fanout, Replayed, Subscriber, encode_reset, reset_data
from .handover import hand_over
from .limits import Limits
from .operations import refuse_when_draining
from .ownership import HIDDEN_CHANNEL, stream_access
from .settings import HubSettings
from .transcode import ALL, Feed, Transcoding, select

__all__ = ["Writer", "routes", "stream_channel"]

log = logging.getLogger(__name__)

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

routes = web.RouteTableDef()


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
    channel = channel_name(request)
    principal = request.app[AUTH].require(request, "subscribe", channel)
    refuse_when_draining(request)
    position = _requested_position(request)
    return await stream_channel(request, channel, position, principal, check_owner=True)


async def _start(
    request: web.Request, channel: str, position: str | None, transcoding: Transcoding | None = None
) -> tuple[str, RangeResult | None, bytes, bool] | None:
    """Where the stream starts: (position, the first history page if one was read, the preamble, whether the store
    was seen to hold the stream); None when the client already has the channel's end marker (answer 204, which tells
    EventSource to stop reconnecting). A stream in another format has no preamble: its clients know no `retry:`."""
    settings = request.app[SETTINGS]
    fanout = request.app[FANOUT]
    preamble = retry(settings.retry_ms) + comment("ok") if transcoding is None else b""
    if transcoding is not None and position is not None and fanout.has_feed(channel, transcoding.key):
        # This node reads the channel in that format already, and kept it whole: `_catch_up` serves it from there.
        request.app[METRICS].resumes.labels("window").inc()
        return position, None, preamble, False
    if position is None:
        # Live: start after whatever the channel holds now. The client is told that position at once, so a
        # reconnect before the first event resumes from it instead of silently starting from "now" again.
        # A channel this node tails already knows a position that serves (its tail's): no store read.
        live = fanout.live_position(channel)
        existed = False
        if live is None:
            info = await fanout.channel_info(channel)
            if info is not None and info.closed:
                return None
            live = info.last_id if info is not None else ZERO_ID
            existed = info is not None
        return live, None, preamble + event_id(live), existed
    if transcoding is None and fanout.can_resume(channel, position):
        # What the client missed is in this node's window of the channel: `_catch_up` serves it from memory.
        request.app[METRICS].resumes.labels("window").inc()
        return position, None, preamble, False
    request.app[METRICS].resumes.labels("store").inc()
    first = await _history(request, channel, position)
    if first.closed and check_position(position, first) is None and parse_id(position) >= parse_id(first.last_id):
        return None
    return position, first, preamble, first.exists


class Writer(Protocol):
    async def write(self, data: bytes) -> None: ...


async def stream_channel(
    request: web.Request,
    channel: str,
    position: str | None,
    principal: Principal,
    *,
    check_owner: bool = False,
    transcoder: Transcoding | None = None,
    into: Writer | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Answer with the channel's SSE stream from `position` (None: live). Validation and authorization by pattern are
    the caller's; with `check_owner`, so is nothing else: another client's generation is streamed as a channel that
    does not exist (see hub.ownership). The stream ends when the principal's token expires (the client reconnects with
    a fresh one).

    `transcoder`: write the events in another API's format instead (hub.transcode), heartbeats still as comments,
    which every SSE reader skips. `into`: write them there, not as this request's response (which is then left for
    the caller to make: a whole answer built from the events).
    """
    start = await _start(request, channel, position, transcoder)
    provisional = None
    if check_owner:
        # After the store was read, so that a stream seen to exist with no owner is known to be no generation's.
        reachable, provisional = await stream_access(request, principal, channel, existed=start is None or start[3])
        if not reachable:
            # Another client's generation: streamed as a channel that does not exist (the same preamble, the same
            # reset for a resume), and nothing ever comes. A refusal would tell the caller the channel is there.
            channel = HIDDEN_CHANNEL
            start = await _start(request, channel, position, transcoder)
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
    resp = web.StreamResponse(headers={**_SSE_HEADERS, **(headers or {})})
    # The connection ends with the stream (a handed-over stream closes it): `Connection: close` tells the client
    # not to send its next request (the reconnect) on it.
    resp.force_close()
    out: Writer = into if into is not None else resp
    sub = Subscriber(channel, request.transport, settings.max_buffer_bytes)
    sub.provisional = provisional
    sub.native = out is resp
    feed = fanout.feed(sub, transcoder) if transcoder is not None else None
    # Another API's clients do not reconnect: no age-out ends their streams.
    end = _schedule_end(sub, seconds_left(principal), settings, age_out=transcoder is None)
    release = _Release(fanout, sub, end, limits, client)
    handed_over = False
    try:
        fanout.register(sub)
        metrics.connections_total.inc()
        if into is None:
            await resp.prepare(request)
        # Events may be written by the fan-out straight to the transport (see Subscriber): they must be framed the
        # way this response's body is (chunked for HTTP/1.1, raw for HTTP/1.0; never compressed).
        sub.chunked = resp.headers.get("Transfer-Encoding") == "chunked"
        if preamble:
            await out.write(preamble)
        handed_over = await _follow(request, out, resp, sub, release, position, first, feed)
        if handed_over:
            return resp
        if feed is not None and not sub.cut and (ending := _ending(sub, feed)):
            await out.write(ending)
    except ConnectionError:
        # The client went away (as early as before the headers were written: a reconnect storm does that), or
        # was cut off as a slow consumer; it resumes from its last id.
        pass
    except BackendUnavailable as e:
        metrics.backend_errors.labels("history").inc()
        log.info("ending stream on %s: %s", channel, e)
        if feed is not None and (ending := _ending(sub, feed)):
            with contextlib.suppress(ConnectionError):
                await out.write(ending)
    finally:
        if not handed_over:
            release()
    return resp


def _ending(sub: Subscriber, feed: Feed) -> bytes:
    """What ends a stream in another format that ends before its channel: taken when the fan-out ended it, if it read
    a shared feed by then; else its own encoder's, which took what the stream was written."""
    ending = sub.view.ending if sub.view is not None else None
    return ending if ending is not None else feed.encoder.cut()


async def _follow(
    request: web.Request,
    out: Writer,
    resp: web.StreamResponse,
    sub: Subscriber,
    release: _Release,
    position: str,
    first: RangeResult | None,
    feed: Feed | None,
) -> bool:
    """Catch up, then follow the live feed until the stream ends. True if it was handed over (then it lives on)."""
    if not await _catch_up(request, out, sub, position, first, feed):
        return False
    # Write what the catch-up queued, then hand the live stream over to a minimal protocol (hub.handover): checked and
    # done synchronously, so nothing can be pushed in between. Only a stream written as the response: the hand-over
    # writes what the fan-out pushes as it is.
    while (chunk := sub.take_pending()) is not None:
        await out.write(chunk)
    if out is resp and not sub.ended and hand_over(request, sub, release):
        return True
    while (chunk := await sub.next_chunk()) is not None:
        await out.write(chunk)
    return False


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


def _schedule_end(
    sub: Subscriber, token_left_s: float | None, settings: HubSettings, *, age_out: bool = True
) -> asyncio.TimerHandle | None:
    """End the stream when its token expires (the client reconnects with a fresh one) or when it reaches the maximum
    connection age, whichever comes first.

    The age is drawn between 80% and 100% of the setting, so streams opened together (after a deploy, a storm) do not
    all end together; an aged-out stream is told to reconnect after a random 25-100% of the retry delay, and through the
    load balancer lands where connections are fewest: that is how a node added by a scale-up gets its share.
    """
    loop = asyncio.get_running_loop()
    age = settings.max_connection_age_s if age_out else 0
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
    request: web.Request, resp: Writer, sub: Subscriber, position: str, r: RangeResult | None, feed: Feed | None
) -> bool:
    """Replay history after `position` until this node's live tail can take over; then join the live feed. With
    `feed`, the stream is in another format: the history goes through the feed's encoder, which the fan-out shares or
    drops when the stream joins.

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
                if data := _reset(reset, sub, feed):
                    await resp.write(data)
                position = reset.continue_after
                replayed = None
                r = await _history(request, sub.channel, position)
                continue
            if r.entries:
                data, replayed = _replay(r, position, sub, feed)
                if data:
                    await resp.write(data)
                position = r.entries[-1].id
                if r.entries[-1].close:
                    return False
            elif r.closed and parse_id(position) >= parse_id(r.last_id):
                return False
            if r.more:
                r = await _history(request, sub.channel, position)
                continue
        if _attach(fanout, sub, position, replayed, feed, from_memory=r is None):
            return True
        replayed = None
        r = await _history(request, sub.channel, position)
        if not r.entries and check_position(position, r) is None:
            # The node's tail is ahead of the stream itself: entries it read are gone (the stream was lost or
            # recreated). Start the channel afresh; its other streams end and resume with a reset.
            fanout.break_channel(sub.channel, "tail ahead of the stream")


def _attach(
    fanout: Fanout, sub: Subscriber, position: str, replayed: Replayed | None, feed: Feed | None, *, from_memory: bool
) -> bool:
    # Both synchronous: what the window (or the feed) serves is queued before anything the tail dispatches next.
    if feed is None:
        return fanout.resume(sub, position) or fanout.try_attach(sub, position, replayed)
    return (from_memory and fanout.resume_feed(sub, feed.key)) or fanout.try_attach(sub, position, feed=feed)


def _replay(r: RangeResult, position: str, sub: Subscriber, feed: Feed | None) -> tuple[bytes, Replayed | None]:
    """A page of history as this stream is written it; native, also the page as the channel's resume window."""
    if feed is not None:
        return select(feed.take(r.entries), ALL, _skip(sub)), None
    chunks = [encode_event(e.id, e.event, e.data) for e in r.entries]
    return b"".join(chunks), Replayed(parse_id(position), [e.key for e in r.entries], chunks)


def _reset(reset: Reset, sub: Subscriber, feed: Feed | None) -> bytes:
    if feed is None:
        return encode_reset(reset)
    return select(feed.take_reset(parse_id(reset.continue_after), reset_data(reset)), ALL, _skip(sub))


def _skip(sub: Subscriber) -> int:
    return sub.view.skip if sub.view is not None else 0


async def _may_follow(request: web.Request, sub: Subscriber) -> bool:
    """Settle a provisional stream (see hub.ownership.stream_access) whose catch-up found the channel written."""
    owner = await request.app[BACKEND].owner(sub.channel)
    if owner is not None and owner != sub.provisional:
        return False
    sub.provisional = None
    return True
