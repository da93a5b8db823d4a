"""Hand a live SSE connection over from aiohttp to a minimal protocol, so an idle stream costs a few KiB, not 13.

aiohttp keeps, for every open response, two tasks, their coroutine frames, the request, the response, the request
handler and its parser: about 10 KiB per connection before any of our own objects (measured: a bare aiohttp +
uvloop streaming handler holds 9.9 KiB per idle connection; a bare uvloop protocol 1.5 KiB). Once a stream has
caught up, everything it still does is the fan-out writing to its transport, which needs none of that. So the
handler moves the transport to `_LiveStream` and tells aiohttp the connection is gone; aiohttp drops its objects
without closing the socket, and the stream goes on with the Subscriber writing to the transport directly.

This relies on how aiohttp's `RequestHandler.connection_lost` behaves (it closes `self.transport` unless that is None,
and cancels the handler's task). `tests/hub/test_handover.py` pins that behaviour: an aiohttp upgrade that changes it
fails there, and `hand_over` falls back (returns False) when the connection is not the one it expects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from .fanout import Subscriber

__all__ = ["hand_over"]

log = logging.getLogger(__name__)


class _LiveStream(asyncio.Protocol):
    """The protocol of a handed-over stream: it only learns that the connection ended."""

    __slots__ = ("_on_lost", "_sub")

    def __init__(self, sub: Subscriber, on_lost: Callable[[], None]) -> None:
        self._sub = sub
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        # A client has nothing more to say on an event stream; a pipelined request cannot be answered after an
        # endless body. Ignored, like aiohttp would until the stream ends.
        pass

    def eof_received(self) -> bool:
        # The client closed its side: finish ours too (the default, said explicitly).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._sub.end()
        self._on_lost()


def hand_over(request: web.Request, sub: Subscriber, on_lost: Callable[[], None]) -> bool:
    """Move the connection of `request` to a minimal protocol; `sub` then writes (and ends) the stream by itself and
    `on_lost` runs when the connection closes. Synchronous: call it when nothing is pending for `sub`. Returns False
    (nothing changed) when the connection is not one this can take over; the caller then keeps serving it."""
    handler = request.protocol
    transport = request.transport
    if transport is None or transport.is_closing() or handler.transport is not transport:
        return False
    # aiohttp's connection_lost closes the handler's transport: detach it from the handler first.
    handler.transport = None
    transport.set_protocol(_LiveStream(sub, on_lost))
    sub.hand_over()
    # aiohttp forgets the connection and cancels the request's task; the caller returns straight away.
    handler.connection_lost(None)
    return True
