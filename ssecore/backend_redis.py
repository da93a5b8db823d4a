"""RedisBackend: one Redis Stream per channel; appends and history reads are Lua scripts, so each is atomic.

Key layout (the only place that builds keys): `<prefix>ch:{<channel>}` per channel (the hash tag keeps a channel on
one cluster slot), beside it `<prefix>fence:{<channel>}`, `<prefix>owner:{<channel>}` (a generation's channel: who owns
it) and `<prefix>idem:{<channel>}:<key>`. Appends and deletions
also publish to the shard channel named like the stream key, which is how they reach every node's tail reader.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from . import scripts
from .backend import (
    ANY_OWNER,
    DEFAULT_IDEMPOTENCY_WINDOW_S,
    MAX_KEY,
    TRIM_SLACK_MAX,
    ZERO_ID,
    AnyOwner,
    AppendBatch,
    Appended,
    BackendError,
    BackendUnavailable,
    ChannelClosed,
    ChannelInfo,
    ChannelLost,
    ChannelOwned,
    ChannelRewound,
    Fenced,
    Idempotency,
    IdempotencyConflict,
    NewEvent,
    NotReplicated,
    RangeResult,
    TailReader,
    format_id,
)
from .redis_client import RedisTarget, client_kwargs, connect, redis_call
from .redis_pipe import LostHandler, PushHandler, RedisPipe, ReplyError, SubscribingConnection
from .rediskeys import RedisKeys
from .tail_redis import RedisTailReader, TailSource, stream_entry

__all__ = ["RedisBackend"]

log = logging.getLogger(__name__)

_MAX_ID = format_id(MAX_KEY)


# The scripts (ssecore/scripts/*.lua say what each takes and does): appends with their checks and rings, history reads,
# deletion, and a generation's channel reserved and released.
_APPEND_LUA = scripts.load("append", TRIM_SLACK=TRIM_SLACK_MAX)
_RANGE_LUA = scripts.load("range")
_DELETE_LUA = scripts.load("delete")
_RESERVE_LUA = scripts.load("reserve")
_RELEASE_LUA = scripts.load("release")


def _version(info: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:2] if x.isdigit())


# The append script's refusals (see scripts/append.lua), told apart from the store's own error replies.
_REFUSALS = ("CLOSED", "FENCED", "OWNED", "LOST", "REWOUND")


def _refused(reply: str) -> BackendError:
    """What an error reply means: the ones the append script raises on purpose, or the store refusing work (OOM,
    READONLY after a failover, MISCONF), which is not a client mistake: a 503."""
    if reply.startswith("CLOSED"):
        return ChannelClosed(reply)
    if reply.startswith("FENCED"):
        return Fenced(reply)
    if reply.startswith("OWNED"):
        return ChannelOwned(reply)
    if reply.startswith("LOST"):
        return ChannelLost(reply)
    if reply.startswith("IDEMPOTENCY"):
        return IdempotencyConflict(reply)
    if reply.startswith("REWOUND"):
        return ChannelRewound(reply)
    log.warning("redis refused a command: %s", reply)
    return BackendUnavailable(f"redis error: {reply.split(' ', 1)[0]}")


class RedisBackend:
    def __init__(
        self,
        url: str | RedisTarget,
        *,
        prefix: str,
        history: int,
        ttl_s: float,
        timeout_s: float = 5.0,
        max_connections: int = 32,
        idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
        cluster: bool = False,
        replicas: int = 0,
        replicas_timeout_s: float = 1.0,
    ) -> None:
        self._target = target = RedisTarget.of(url)
        # With replicas, every append is followed by WAIT on its connection (see `_appends`); not on a cluster, where
        # WAIT would have to go to each key's node (the settings refuse the two together).
        assert not (replicas and cluster)
        self._replicas = replicas
        self._wait = ("WAIT", replicas, max(1, int(replicas_timeout_s * 1000))) if replicas else None
        self.cluster = cluster
        self._history = history
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._idempotency_ms = max(1, int(idempotency_window_s * 1000))
        self._timeout_s = timeout_s
        self.keys = RedisKeys(prefix, 0 if cluster else target.db)
        self._redis, self._gate = connect(target, cluster=cluster, timeout_s=timeout_s, max_connections=max_connections)
        self._version_checked = False
        self._append = self._redis.register_script(_APPEND_LUA)
        self._range = self._redis.register_script(_RANGE_LUA)
        self._delete = self._redis.register_script(_DELETE_LUA)
        self._reserve = self._redis.register_script(_RESERVE_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)
        # Publishes take the pipelined connection (see redis_pipe) where it can serve the URL. It connects to one
        # address for good, so with Sentinels (whose primary moves) redis-py's own client serves them instead.
        pipe = not cluster and bool(target.url) and RedisPipe.supports(target.url)
        self._pipe = RedisPipe(target.url, timeout_s=timeout_s) if pipe else None

    async def _call(self, coro: Any) -> Any:
        """Run one Redis call with a deadline; map every Redis failure to BackendUnavailable (a 503).

        Error replies such as OOM, READONLY (after a failover) or MISCONF are the store refusing work, not a client
        mistake; the errors the append script raises on purpose become ChannelClosed and Fenced.
        """
        try:
            return await redis_call(coro, self._timeout_s, self._gate)
        except BackendUnavailable as e:
            if isinstance(reply := e.__cause__, ResponseError):
                raise _refused(str(reply)) from None
            raise

    async def _run_append(self, keys: list[str], args: list[Any]) -> Any:
        if self._pipe is not None:
            reply = await self._pipe.evalsha(self._append.script, keys, args, wait=self._wait)
            if isinstance(reply, ReplyError):
                raise _refused(str(reply))
            return reply
        if self._replicas:
            [reply] = await self._append_waited([(keys, args)])
            if isinstance(reply, BackendError):
                raise reply
            return reply
        return await self._call(self._append(keys=keys, args=args))

    async def _append_waited(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Append calls through redis-py, then WAIT on their connection (one pipeline): per call its reply, or the
        BackendError that refused it, NotReplicated for one that succeeded where fewer than the required replicas
        confirmed it in time."""
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            await self._append(keys=keys, args=args, client=pipe)
        assert self._wait is not None
        pipe.execute_command(*self._wait)
        try:
            *raw, acked = await self._call(pipe.execute(raise_on_error=False))
        except BackendError as e:
            return [e] * len(calls)
        short = None
        if not isinstance(acked, int) or acked < self._replicas:
            short = NotReplicated(self._replicas, acked if isinstance(acked, int) else 0)
        out: list[Any] = []
        for r in raw:
            if isinstance(r, ResponseError):
                # NOSCRIPT too: the pipeline loaded the script just before, so the server changed in between (a
                # failover); the call did not run, and a retry runs it.
                out.append(_refused(str(r)))
            elif isinstance(r, Exception):
                out.append(BackendUnavailable(f"redis unavailable: {type(r).__name__}"))
            else:
                out.append(r if short is None else short)
        return out

    def _append_call(self, b: AppendBatch, idempotency: Idempotency | None = None) -> tuple[list[str], list[Any]]:
        # Declared keys are passed in order (and in one slot), the fence's even if unused.
        keys = [self.keys.stream(b.channel), self.keys.fence(b.channel), self.keys.owner(b.channel)]
        args: list[Any] = [self._history, self._ttl_ms, "1" if b.close else "0"]
        if b.fence is None:
            args += ("", "", 0)
        else:
            args += ("take" if b.fence.take else "check", b.fence.owner, b.fence.attempt)
        if idempotency is None:
            args += ("", 0)
        else:
            keys.append(self.keys.idempotency(b.channel, idempotency.key))
            args += (idempotency.fingerprint, self._idempotency_ms)
        args.append(self.keys.ring_suffix)
        expected = b.fence.channel_owner if b.fence is not None and b.fence.take else None
        args.append(expected or "")
        args.append((b.fence.after or "") if b.fence is not None and not b.fence.take else "")
        for ev in b.events:
            args += (ev.event, ev.data)
        return keys, args

    async def append(self, channel: str, events: Sequence[NewEvent], *, close: bool = False) -> list[str]:
        keys, args = self._append_call(AppendBatch(channel, events, close))
        return list(await self._run_append(keys, args))

    async def append_once(
        self, channel: str, events: Sequence[NewEvent], idempotency: Idempotency, *, close: bool = False
    ) -> Appended:
        keys, args = self._append_call(AppendBatch(channel, events, close), idempotency)
        ids = list(await self._run_append(keys, args))
        if ids and ids[0] == "=":
            return Appended(ids[1:], True)
        return Appended(ids, False)

    async def append_many(self, batches: Sequence[AppendBatch]) -> list[list[str] | BackendError]:
        if not batches:
            return []
        if self._pipe is not None:
            return await self._append_piped(batches)
        if self._replicas:
            replies = await self._append_waited([self._append_call(b) for b in batches])
            return [r if isinstance(r, BackendError) else list(r) for r in replies]
        if len(batches) == 1:
            # One script call needs no pipeline (common at low load, and the one-by-one baseline).
            keys, args = self._append_call(batches[0])
            try:
                return [list(await self._run_append(keys, args))]
            except BackendError as e:
                return [e]
        # One pipeline, one round trip; each script call stays atomic on its own. Not a transaction: one refused
        # channel (closed) must not refuse the others.
        pipe = self._redis.pipeline(transaction=False)
        calls = [self._append_call(b) for b in batches]
        for keys, args in calls:
            if self.cluster:
                # The cluster pipeline refuses script objects; EVALSHA it routes by its key like any command.
                pipe.execute_command("EVALSHA", self._append.sha, len(keys), *keys, *args)
            else:
                await self._append(keys=keys, args=args, client=pipe)
        raw = await self._rerun_unloaded(await self._call(pipe.execute(raise_on_error=False)), calls)
        results: list[list[str] | BackendError] = []
        for r in raw:
            if isinstance(r, BackendError):
                results.append(r)
            elif isinstance(r, ResponseError) and str(r).split(" ", 1)[0] in _REFUSALS:
                results.append(_refused(str(r)))
            elif isinstance(r, Exception):
                results.append(BackendUnavailable(f"redis error: {str(r).split(' ', 1)[0]}"))
            else:
                results.append(list(r))
        return results

    async def _append_piped(self, batches: Sequence[AppendBatch]) -> list[list[str] | BackendError]:
        """All the calls in one write on the pipelined connection: a pipeline without redis-py's per-command cost.
        Each call succeeds or fails on its own."""
        assert self._pipe is not None
        try:
            calls = [self._append_call(b) for b in batches]
            replies = await self._pipe.evalsha_many(self._append.script, calls, wait=self._wait)
        except BackendUnavailable as e:  # no connection at all
            return [e] * len(batches)
        out: list[list[str] | BackendError] = []
        for r in replies:
            if isinstance(r, BackendError):
                out.append(r)
            elif isinstance(r, ReplyError):
                out.append(_refused(str(r)))
            else:
                out.append(list(r))
        return out

    async def _rerun_unloaded(self, raw: list[Any], calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run again the calls a node refused with NOSCRIPT: one that has not seen the script yet (new, restarted,
        failed over). They did not run, so running them (the script object loads it first) appends once; they are all
        of that node's calls, so their order holds."""
        for i, r in enumerate(raw):
            if isinstance(r, NoScriptError):
                keys, args = calls[i]
                try:
                    raw[i] = await self._call(self._append(keys=keys, args=args))
                except BackendError as e:
                    raw[i] = e
        return raw

    async def range(self, channel: str, after: str, *, limit: int) -> RangeResult:
        # Redis cannot express "after the largest id" as an exclusive start; nothing can follow it anyway.
        count = 0 if after == _MAX_ID else limit + 1
        raw = await self._call(self._range(keys=[self.keys.stream(channel)], args=[f"({after}", count]))
        if raw[0] == 0:
            return RangeResult(False, [], False, None, ZERO_ID, ZERO_ID, False)
        _, _length, last_id, max_deleted, first_id, closed, entries = raw
        parsed = [stream_entry(e) for e in entries]
        return RangeResult(
            exists=True,
            entries=parsed[:limit],
            more=len(parsed) > limit,
            first_id=first_id or None,
            last_id=last_id,
            max_deleted_id=max_deleted,
            closed=bool(closed),
        )

    async def info(self, channel: str) -> ChannelInfo | None:
        raw = await self._call(self._range(keys=[self.keys.stream(channel)], args=["(0-0", 0]))
        if raw[0] == 0:
            return None
        _, length, last_id, _max_deleted, first_id, closed, _ = raw
        return ChannelInfo(length=int(length), first_id=first_id or None, last_id=last_id, closed=bool(closed))

    async def delete(self, channel: str, *, owner: str | None | AnyOwner = ANY_OWNER) -> bool:
        keys = [self.keys.stream(channel), self.keys.fence(channel), self.keys.owner(channel)]
        check = ("0", "") if owner is ANY_OWNER else ("1", owner or "")
        return bool(await self._call(self._delete(keys=keys, args=[self.keys.ring_suffix, *check])))

    async def reserve(self, channel: str, owner: str) -> bool:
        keys = [self.keys.stream(channel), self.keys.owner(channel)]
        return bool(await self._call(self._reserve(keys=keys, args=[owner, self._ttl_ms])))

    async def release(self, channel: str, owner: str) -> bool:
        keys = [self.keys.stream(channel), self.keys.owner(channel)]
        return bool(await self._call(self._release(keys=keys, args=[owner])))

    async def owner(self, channel: str) -> str | None:
        value: str | None = await self._call(self._redis.get(self.keys.owner(channel)))
        return value

    async def open_reader(self) -> TailReader:
        source = TailSource(self._redis, self.keys, self.cluster, self._timeout_s, self._call, self._open_subscriber)
        return RedisTailReader(source)

    async def _open_subscriber(self, node_name: str, on_push: PushHandler, on_lost: LostHandler) -> Any:
        """A subscribing connection for the live tail, to the node named (the single Redis: "")."""
        if not self.cluster and self._pipe is not None:
            # Rings are parsed as they arrive, many per read, and handled in place: no task wakes per message.
            return SubscribingConnection(await self._pipe.open(on_push, on_lost))
        # Otherwise redis-py's PubSub, read by a task of its own (`_listen`). Keepalive, so that a silently dead
        # connection is noticed, not left to the sweep.
        ours = {**client_kwargs(self._timeout_s), "socket_keepalive": True}
        if not self.cluster:
            return self._target.pubsub(self._redis, **ours)
        # The node's own connection settings (password, TLS) from the cluster client, with ours on top.
        node = self._redis.get_node(node_name=node_name)
        pool = aioredis.ConnectionPool(
            connection_class=node.connection_class, max_connections=1, **{**node.connection_kwargs, **ours}
        )
        return aioredis.Redis(connection_pool=pool).pubsub()

    async def ping(self) -> None:
        if not self._version_checked:
            info = await self._call(self._redis.info("server"))
            # A cluster client may answer with one section per node: the oldest one decides.
            infos = list(info.values()) if info and all(isinstance(v, dict) for v in info.values()) else [info]
            version = min(_version(i) for i in infos)
            if version < (7, 0):
                # XSETID MAXDELETEDID and max-deleted-entry-id, which make resets exact, came with Redis 7.0.
                log.error(
                    "Redis %s is too old: the hub needs Redis 7.0 or newer (or Valkey)", ".".join(map(str, version))
                )
                raise BackendUnavailable("Redis 7.0 or newer is required")
            self._version_checked = True
        await self._call(self._redis.ping())

    async def aclose(self) -> None:
        if self._pipe is not None:
            await self._pipe.aclose()
        await self._redis.aclose()
