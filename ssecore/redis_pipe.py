"""RedisPipe: one pipelined connection for the hub's publish path, where redis-py's per-call cost was most of it.

Each publish is one script call. Through redis-py every call takes a pooled connection, packs the command in Python,
arms its own timeout and sends on its own connection: 92 µs of CPU per append, against 18 through this pipe (measured
with four concurrent callers, 20,000 appends each way). Here every call made in one turn of the event loop leaves in
one write on one connection, and the replies, which Redis sends in the order it ran the commands, are matched to their
callers in that order.

Failures behave as they do through redis_client: nothing is retried after it was sent (a repeated append would append
twice), and every failure raises BackendUnavailable. A call's deadline is kept by one watchdog per connection rather
than a timer per call: replies come in order, so once the oldest unanswered call is past its deadline the connection
is stuck, every call on it fails, and it is dropped; the next call opens a fresh one.

Only plain TCP and Unix socket URLs are served (`supports`); for TLS (`rediss://`) and Redis Cluster the backend keeps
redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis

from .backend import BackendUnavailable, NotReplicated
from .redis_client import parse_redis_url

__all__ = ["RedisPipe", "ReplyError", "SubscribingConnection", "pack_command"]

ReplyError = hiredis.ReplyError


def pack_command(args: Sequence[str | bytes | int]) -> bytes:
    """One command in RESP: an array of bulk strings (str as UTF-8, int in decimal). hiredis packs it in C."""
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # its stub allows a 1-tuple only
    return packed


# Messages Redis pushes to a connection in subscribed mode (RESP2: arrays led by their kind), not replies to a call.
_PUSH_KINDS = frozenset(("smessage", "ssubscribe", "sunsubscribe"))

PushHandler = Callable[[list[Any]], None]
LostHandler = Callable[[BackendUnavailable], None]


class _Protocol(asyncio.Protocol):
    """One connection: the calls sent and not yet answered, in order, each with its deadline. With `on_push`, it is a
    subscribing connection: pushed messages go to `on_push` as they are parsed, and the loss of the connection to
    `on_lost`."""

    def __init__(
        self, timeout_s: float, on_push: PushHandler | None = None, on_lost: LostHandler | None = None
    ) -> None:
        self._on_push = on_push
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader(encoding="utf-8")
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._wait: tuple[bytes, asyncio.Future[Any]] | None = None  # the WAIT that ends this turn's write, if any
        self.failed: BackendUnavailable | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one packed command; the future gets its reply (an error reply as a ReplyError value)."""
        fut = self._future()
        if not fut.done():
            self._queue(packed)
            self._expect(fut)
        return fut

    def send_wait(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue a WAIT (`packed`) to follow everything queued in this turn of the loop: one at the end of the write,
        shared by every caller that asks in the turn. It counts the replicas holding the connection's last write, so
        it covers all the calls before it; a WAIT per call would hold the connection once per call instead."""
        if self._wait is not None:
            return self._wait[1]
        fut = self._future()
        if not fut.done():
            self._queue(None)
            self._wait = (packed, fut)
        return fut

    def post(self, packed: bytes) -> None:
        """Queue a command whose answers come as pushes (SSUBSCRIBE, SUNSUBSCRIBE), not as a reply to wait for."""
        if self.failed is not None:
            raise self.failed
        self._queue(packed)

    def _future(self) -> asyncio.Future[Any]:
        """A reply's future: already failed when the connection has."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self.failed is not None:
            fut.set_exception(self.failed)
        return fut

    def _queue(self, packed: bytes | None) -> None:
        """Add to this turn's write (None: nothing yet, but make sure the write goes out)."""
        if not self._out and self._wait is None:
            # Everything queued in this turn of the loop leaves in one write.
            self._loop.call_soon(self._flush)
        if packed is not None:
            self._out.append(packed)

    def _expect(self, fut: asyncio.Future[Any]) -> None:
        """The next reply is `fut`'s, due within the deadline."""
        self._waiting.append((fut, self._loop.time() + self._timeout_s))
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self._waiting[0][1], self._check)

    def _flush(self) -> None:
        if self._wait is not None and self.failed is None:
            packed, fut = self._wait
            self._out.append(packed)
            self._expect(fut)
        self._wait = None
        out, self._out = self._out, []
        if out and self._transport is not None and self.failed is None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        on_push = self._on_push
        while (reply := self._reader.gets()) is not False:
            if on_push is not None and type(reply) is list and reply and reply[0] in _PUSH_KINDS:
                on_push(reply)
                continue
            if not waiting:
                # On a subscribing connection, a refused SSUBSCRIBE (say, NOPERM: an ACL user without the channel).
                why = f"refused: {reply}" if isinstance(reply, ReplyError) else "a reply nobody asked for"
                self._fail(BackendUnavailable(f"redis unavailable: {why}"))
                return
            fut, _ = waiting.popleft()
            if not fut.done():  # its caller may have given up (cancelled)
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(BackendUnavailable(f"redis unavailable: connection lost ({type(exc).__name__ if exc else 'EOF'})"))

    def _check(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        if self._loop.time() >= deadline:
            self._fail(BackendUnavailable("redis unavailable: TimeoutError"))
        else:
            self._watchdog = self._loop.call_at(deadline, self._check)

    def _fail(self, error: BackendUnavailable) -> None:
        if self.failed is None:
            self.failed = error
            if self._on_lost is not None:
                self._on_lost(error)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._out = []
        if self._wait is not None:
            self._waiting.append((self._wait[1], 0.0))
            self._wait = None
        while self._waiting:
            fut, _ = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._fail(BackendUnavailable("redis unavailable: the connection was closed"))


class RedisPipe:
    """Script calls over one pipelined connection, opened on first use and again after any failure."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self._opts: dict[str, Any] = parse_redis_url(url)
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._attempt: asyncio.Future[_Protocol] | None = None

    @staticmethod
    def supports(url: str) -> bool:
        return urlsplit(url).scheme in ("redis", "unix")

    async def _connection(self) -> _Protocol:
        p = self._protocol
        if p is not None and p.failed is None:
            return p
        # One attempt at a time, shared by every caller that needs it: queued one after another, the tenth caller
        # would wait ten deadlines for a server that does not answer.
        attempt = self._attempt
        if attempt is None:
            attempt = self._attempt = asyncio.ensure_future(self.open())
            attempt.add_done_callback(self._attempted)
        return await asyncio.shield(attempt)

    def _attempted(self, attempt: asyncio.Future[_Protocol]) -> None:
        self._attempt = None
        if not attempt.cancelled() and attempt.exception() is None:  # retrieved, even with nobody left to await it
            self._protocol = attempt.result()

    async def open(self, on_push: PushHandler | None = None, on_lost: LostHandler | None = None) -> _Protocol:
        """A new connection to the URL's server, authenticated and on its database (see `_Protocol` for the
        handlers)."""
        loop = asyncio.get_running_loop()
        timeout_s = self._timeout_s
        opts = self._opts

        def factory() -> _Protocol:
            return _Protocol(timeout_s, on_push, on_lost)

        p = None
        try:
            async with asyncio.timeout(timeout_s):
                if "path" in opts:
                    _, p = await loop.create_unix_connection(factory, opts["path"])
                else:
                    transport, p = await loop.create_connection(
                        factory, opts.get("host", "localhost"), opts.get("port", 6379)
                    )
                    # A subscribing connection may be silent for long: keepalive notices a peer that vanished.
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for r in await asyncio.gather(*(p.send(pack_command(c)) for c in self._setup())):
                    if isinstance(r, ReplyError):
                        raise BackendUnavailable(f"redis refused the connection: {str(r).split(' ', 1)[0]}")
        except BaseException as e:
            if p is not None:
                p.close()
            if isinstance(e, OSError | TimeoutError):
                raise BackendUnavailable(f"redis unavailable: {type(e).__name__}") from e
            raise
        return p

    def _setup(self) -> list[list[str | bytes | int]]:
        """The commands a new connection starts with: AUTH and SELECT, as the URL asks."""
        opts = self._opts
        setup: list[list[str | bytes | int]] = []
        if opts.get("password") is not None:
            setup.append(["AUTH", *([opts["username"]] if opts.get("username") else []), opts["password"]])
        if opts.get("db"):
            setup.append(["SELECT", opts["db"]])
        return setup

    async def call(self, *args: str | bytes | int) -> Any:
        """One command's reply; an error reply comes back as a ReplyError value, not raised."""
        p = await self._connection()
        return await p.send(pack_command(args))

    async def evalsha(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[str | bytes | int],
        *,
        wait: Sequence[str | int] | None = None,
    ) -> Any:
        """Run a Lua script by its digest, or by its text when this Redis has not cached it yet (NOSCRIPT: a new,
        restarted or flushed server; the call did not run, so sending it again runs it once). `wait` as in
        `evalsha_many`."""
        [reply] = await self.evalsha_many(script, [(keys, args)], wait=wait)
        if isinstance(reply, BackendUnavailable):
            raise reply
        return reply

    async def evalsha_many(
        self,
        script: str,
        calls: Sequence[tuple[Sequence[str], Sequence[str | bytes | int]]],
        *,
        wait: Sequence[str | int] | None = None,
    ) -> list[Any]:
        """Several script calls (keys, args) in one write, with no task per call; per call its reply, a ReplyError
        value, or the BackendUnavailable that failed it. NOSCRIPT is handled as in `evalsha`.

        `wait` (`WAIT <replicas> <ms>`) follows the calls on their connection: a call that succeeded is answered
        NotReplicated unless that many replicas confirmed it within the time.
        """
        sha = _digest(script)
        replies = await self._send([["EVALSHA", sha, len(keys), *keys, *args] for keys, args in calls], wait)
        unloaded = [i for i, r in enumerate(replies) if isinstance(r, ReplyError) and str(r).startswith("NOSCRIPT")]
        if unloaded:
            try:
                again = await self._send(
                    [["EVAL", script, len(calls[i][0]), *calls[i][0], *calls[i][1]] for i in unloaded], wait
                )
            except BackendUnavailable as e:
                again = [e] * len(unloaded)
            for i, reply in zip(unloaded, again, strict=True):
                replies[i] = reply
        return replies

    async def _send(self, commands: list[list[str | bytes | int]], wait: Sequence[str | int] | None) -> list[Any]:
        """`commands` in one write on one connection, then `wait` if given (see `evalsha_many`)."""
        p = await self._connection()
        futures = [p.send(pack_command(c)) for c in commands]
        if wait is not None:
            # On the same connection, at the end of this turn's write: WAIT counts the replicas holding its last write.
            futures.append(p.send_wait(pack_command(wait)))
        replies: list[Any] = []
        for i, fut in enumerate(futures):
            try:
                replies.append(await fut)
            except BackendUnavailable as e:
                replies.append(e)
            except asyncio.CancelledError:
                for rest in futures[i + 1 :]:  # their failures, if any, are nobody's business now
                    rest.add_done_callback(_retrieve)
                raise
        if wait is not None:
            acked, required = replies.pop(), int(wait[1])
            if not isinstance(acked, int) or acked < required:
                short: BackendUnavailable = NotReplicated(required, acked if isinstance(acked, int) else 0)
                replies = [r if isinstance(r, ReplyError | BackendUnavailable) else short for r in replies]
        return replies

    async def aclose(self) -> None:
        if self._attempt is not None:
            self._attempt.cancel()
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


_digests: dict[str, str] = {}


def _digest(script: str) -> str:
    d = _digests.get(script)
    if d is None:
        d = _digests[script] = hashlib.sha1(script.encode()).hexdigest()
    return d


class SubscribingConnection:
    """A subscribing connection of the tail reader (see backend_redis._TailReader) opened by `RedisPipe.open` with
    handlers: pushes are handled as they are parsed, many per read, with no task per message."""

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol

    async def ssubscribe(self, *keys: str) -> None:
        self._protocol.post(pack_command(["SSUBSCRIBE", *keys]))

    async def sunsubscribe(self, *keys: str) -> None:
        self._protocol.post(pack_command(["SUNSUBSCRIBE", *keys]))

    async def aclose(self) -> None:
        self._protocol.close()
