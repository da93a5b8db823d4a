"""Channels over HTTP: the rule for channel names, and a channel's info (GET) and deletion (DELETE)."""

from __future__ import annotations

import re

import orjson
from aiohttp import web

from .appkeys import AUTH, BACKEND, SETTINGS
from .errors import ApiError
from .ownership import channel_reachable, reached_as

__all__ = ["channel_name", "channel_ok", "routes"]

# No "/", "%", "..." tricks can pass: the characters allowed cannot spell a path or an escape.
CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")
_CHANNEL_RULE = 'channel names are 1-{n} characters of A-Z a-z 0-9 _ . : @ - (not ".", no "..")'


def channel_ok(name: str, max_len: int = 200) -> bool:
    # "." and anything with ".." are path segments to every URL normalizer between a client and us: refused.
    return len(name) <= max_len and CHANNEL_RE.fullmatch(name) is not None and name != "." and ".." not in name


def channel_name(request: web.Request) -> str:
    """The channel named in the request's path; ApiError 400 `invalid_channel` if the name breaks the rule."""
    name = request.match_info["channel"]
    max_len = request.app[SETTINGS].max_channel_len
    if not channel_ok(name, max_len):
        raise ApiError(400, "invalid_channel", _CHANNEL_RULE.format(n=max_len))
    return name


routes = web.RouteTableDef()


@routes.get("/v1/channels/{channel}")
async def channel_info(request: web.Request) -> web.Response:
    channel = channel_name(request)
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
    channel = channel_name(request)
    principal = request.app[AUTH].require(request, "publish", channel)
    owner = await reached_as(request, principal, "publish", channel)
    # Deleted only if the owner is still the one the caller was let in for: a generation that took the name after
    # the check is not the caller's to delete, and is answered like no channel.
    if owner is False or not await request.app[BACKEND].delete(channel, owner=owner):
        raise ApiError(404, "channel_not_found", "no such channel")
    return web.Response(status=204)
