"""Who may reach a generation: its owner (the client that started it), or a token that names its channel exactly.

A pattern such as `gen:*` lets a client start generations; it does not reach other clients' ones. Whatever is not
reachable is answered exactly as something that does not exist, so that nothing tells another client it is there.
In anonymous mode everyone is the same principal, and ownership separates no one.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from ssecore.backend import ANY_OWNER, AnyOwner

from .appkeys import BACKEND, LIMITS
from .auth import Action, Principal

__all__ = ["HIDDEN_CHANNEL", "channel_reachable", "may_reach", "reached_as", "stream_access"]

# What a stream of a channel that is not the caller's follows instead: a name no request can give (channel names have
# no "/") and no worker writes (jobs' channels are checked the same way), so it never exists and never has an event.
HIDDEN_CHANNEL = "/"


def may_reach(principal: Principal, client: str, action: Action, channel: str, owner: str | None) -> bool:
    """Whether `principal` (counted as `client`, see Limits.client) may `action` on a generation's `channel` that
    `owner` owns (None: a record kept before owners were, which its channel's patterns decide alone)."""
    if principal.kind == "anonymous" or principal.names(action, channel):
        return True
    return principal.may(action, channel) and (owner is None or owner == client)


async def channel_reachable(request: web.Request, principal: Principal, action: Action, channel: str) -> bool:
    """For a caller whose rights on `channel` were already checked: False when the channel is another client's
    generation's and the token does not name it exactly. One store read, only for tokens that reach the channel by a
    pattern."""
    return await reached_as(request, principal, action, channel) is not False


async def reached_as(
    request: web.Request, principal: Principal, action: Action, channel: str
) -> str | None | AnyOwner | Literal[False]:
    """As `channel_reachable`, with the owner the answer rests on: the owner read (None: no generation's channel),
    ANY_OWNER when none matters (anonymous mode, a token naming the channel), False when not reachable. A change made
    on the strength of it is conditioned on that owner in the store (`Backend.delete(owner=...)`): the name may
    become a generation's between the read and the change."""
    if principal.kind == "anonymous" or principal.names(action, channel):
        return ANY_OWNER
    owner = await request.app[BACKEND].owner(channel)
    if owner is None or owner == request.app[LIMITS].client(request, principal):
        return owner
    return False


async def stream_access(
    request: web.Request, principal: Principal, channel: str, *, existed: bool
) -> tuple[bool, str | None]:
    """Whether a stream of `channel` may be opened, as `channel_reachable` says, and if so for whom it is provisional.

    `existed`: the stream was seen in the store before this check. A name with no owner now may still become a
    generation's (`reserve` takes a name that does not exist): a stream admitted to one it did not see exist is
    provisional, for the client returned, and its right is settled against the owner when the first entries reach it
    (hub.fanout, and the catch-up in hub.stream). A stream that existed with no owner is an ordinary channel's.
    """
    if principal.kind == "anonymous" or principal.names("subscribe", channel):
        return True, None
    client = request.app[LIMITS].client(request, principal)
    owner = await request.app[BACKEND].owner(channel)
    if owner is not None:
        return owner == client, None
    return True, None if existed else client
