"""RedisBackend: one Redis Stream per channel; appends and history reads are Lua scripts, so each is atomic.

Key layout (the only place that builds keys): `<prefix>ch:{<channel>}` per channel (the hash tag keeps a channel on
one cluster slot), beside it `<prefix>fence:{<channel>}`, `<prefix>owner:{<channel>}` (a generation's channel: who owns
it) and `<prefix>idem:{<channel>}:<key>`. Appends and deletions
also publish to the shard channel named like the stream key, which is how they reach every node's tail reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

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
    Entry,
    Fenced,
    Idempotency,
    IdempotencyConflict,
    NewEvent,
    NotReplicated,
    RangeResult,
    ReadResult,
    TailReader,
    format_id,
    parse_id,
)
from .redis_client import RedisTarget, client_kwargs, connect, redis_call
from .redis_pipe import RedisPipe, ReplyError, SubscribingConnection
from .rediskeys import RedisKeys

__all__ = ["RedisBackend"]

log = logging.getLogger(__name__)

_MAX_ID = format_id(MAX_KEY)
# Entries per channel one tail read may return; the rest comes with the next read, in order.
_READ_COUNT = 200
# What the rings of one channel may hold between two tail reads, in characters of their text (counted as they come,
# without encoding them again; a character of it takes 1 to 4 bytes). Past it they are dropped and the channel is
# read from the store instead: a burst, or a reader that is not being read, costs a read, not memory without bound.
_RING_BUFFER_MAX_CHARS = 2 * 1024 * 1024


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


def _entry(raw: Any) -> Entry:
    entry_id, fields = raw[0], raw[1]
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return Entry(entry_id, fields.get("e", "message"), fields.get("d", ""), "c" in fields, fields.get("p"))


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
        parsed = [_entry(e) for e in entries]
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
        return _TailReader(self)

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


class _TailReader:
    """A node's live tail: rung by each channel's shard channel, which carries the appended entries themselves.

    Every append publishes what it added to the stream's own shard channel (see scripts/append.lua) and every deletion
    publishes `d`. This reader subscribes each channel it tails, on one connection per Redis node (one in all on a
    single Redis; on a cluster, the node that owns the channel's slot), and delivers entries from the rings: on the hot
    path a node sends Redis nothing per event. A ring's entries are taken only if they continue from the position
    last delivered (their first `prev`); otherwise, and for a ring without entries, the channel is read with a plain
    XREAD from that position. So a ring that is lost (a dropped connection, a moved slot) or out of step costs
    latency, never an entry. Every `block_s` it reads all its channels anyway, which bounds that latency; on a
    cluster that sweep also notices streams that vanished while their ring was lost.
    """

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        self._subscribed: dict[str, str] = {}  # stream key → name of the node whose connection subscribed it
        self._pubsubs: dict[str, Any] = {}  # node name → its PubSub
        self._listeners: dict[str, asyncio.Task[None]] = {}
        self._rang: set[str] = set()  # stream keys to read
        self._pushed: dict[str, list[Entry]] = {}  # stream key → entries its rings carried, in order
        self._pushed_chars: dict[str, int] = {}  # stream key → the characters of those rings
        self._deleted: list[str] = []
        self._failure: BaseException | None = None
        self._wake = asyncio.Event()
        self._interrupted = False
        self._next_sweep = 0.0
        self._fresh = True  # nothing heard yet, or rings lost: the next sweep also looks for vanished streams
        self._remap = False  # learn the slot map again before subscribing (set after a failure)
        self._unconfirmed: set[str] = set()  # subscriptions sent, not yet confirmed
        self._confirmed = asyncio.Event()
        self._stream_keys: dict[str, str] = {}  # channel → its stream key
        self._last_positions: Mapping[str, str] = {}  # the positions of the last read, and their stream keys
        self._last_keys: dict[str, str] = {}
        self._in_force: dict[str, str] | None = None  # the keys whose subscriptions were all confirmed, if unchanged

    async def read(self, positions: Mapping[str, str], *, block_s: float) -> ReadResult:
        backend = self._backend
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_s
        keys = self._keys_of(positions)
        try:
            async with asyncio.timeout(block_s + backend._timeout_s):
                while True:
                    if keys is not self._in_force:  # not the same channels as last time
                        await self._subscribe(keys)
                        # Unless a subscription was lost while it waited (a slot moved): the next pass makes it again.
                        if self._subscribed.keys() == keys.keys():
                            self._in_force = keys
                    if (
                        not (self._rang or self._pushed or self._deleted or self._interrupted or self._failure)
                        and loop.time() < self._next_sweep
                    ):
                        self._wake.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(max(0.0, min(deadline, self._next_sweep) - loop.time())):
                                await self._wake.wait()
                    self._check()
                    result = await self._read_due(keys, positions, block_s)
                    if result.entries or result.deleted or result.vanished or self._interrupted:
                        self._interrupted = False
                        return result
                    if loop.time() >= deadline:
                        return result
                    await asyncio.sleep(0)  # whatever woke this read, the loop's other work goes on meanwhile
        except (RedisError, RedisClusterException, TimeoutError, OSError, BackendUnavailable) as e:
            # Start afresh: new subscribing connections, on a slot map learnt again (after a failover the old one
            # still names the dead master), and a read of every channel first.
            await self._reset()
            if isinstance(e, BackendUnavailable):
                raise
            raise BackendUnavailable(f"redis unavailable: {type(e).__name__}: {e}") from e

    def _keys_of(self, positions: Mapping[str, str]) -> dict[str, str]:
        """Stream key → channel for the channels to read. Each read gets every channel the node tails, most often the
        same ones as the last read: then the same mapping is returned, found in one comparison."""
        if positions.keys() == self._last_positions.keys():
            self._last_positions = positions
            return self._last_keys
        cache = self._stream_keys
        if len(cache) > 2 * len(positions) + 64:
            self._stream_keys = cache = {c: k for c, k in cache.items() if c in positions}
        keys: dict[str, str] = {}
        for channel in positions:
            key = cache.get(channel)
            if key is None:
                key = cache[channel] = self._backend.keys.stream(channel)
            keys[key] = channel
        self._last_positions, self._last_keys = positions, keys
        return keys

    async def _read_due(self, keys: Mapping[str, str], positions: Mapping[str, str], block_s: float) -> ReadResult:
        """Deliver what the rings carried; read the channels that rang without it, or all of them when a sweep is
        due."""
        loop = asyncio.get_running_loop()
        # Taken before reading: a ring that comes during the read is kept for the next one. A failed read loses none
        # of them: the reader starts afresh (see `read`), and its first read is a sweep.
        pushed, self._pushed = self._pushed, {}
        self._pushed_chars = {}
        rang, self._rang = self._rang, set()
        # A deletion of a channel this node no longer tails concerns nobody here: kept, it would make every later read
        # return at once, and report the channel deleted again once a new incarnation of it is tailed.
        result = ReadResult(deleted=[c for c in self._deleted if c in positions])
        self._deleted = []
        if loop.time() >= self._next_sweep:
            self._next_sweep = loop.time() + block_s
            wanted, sweep = list(keys), True
        else:
            wanted, sweep = [k for k in rang if k in keys], False
            for key, entries in pushed.items():
                channel = keys.get(key)
                if channel is None or key in rang:
                    continue
                if entries[0].prev == positions[channel]:
                    result.entries[channel] = entries  # the common case: they follow on from what was delivered
                    continue
                position = parse_id(positions[channel])
                fresh = [e for e in entries if e.key > position]
                if not fresh:
                    continue  # already delivered (read before its ring came)
                if fresh[0].prev is not None and parse_id(fresh[0].prev) == position:
                    result.entries[channel] = fresh
                else:
                    wanted.append(key)  # out of step with what was delivered: read from the position instead
        if wanted:
            try:
                await self._fetch(wanted, keys, positions, sweep, result)
            except BaseException:
                self._deleted[:0] = result.deleted
                raise
        return result

    def _check(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise ConnectionError(f"a subscribing connection failed: {failure!r}")

    async def _fetch(
        self, wanted: list[str], keys: Mapping[str, str], positions: Mapping[str, str], sweep: bool, out: ReadResult
    ) -> None:
        backend = self._backend
        # Whether a stream that returned nothing still holds the position delivered last: on a cluster at every sweep
        # (a stream may expire, or be lost by a failover, while its subscribers wait), on a single Redis at the first
        # sweep after rings may have been lost (a deletion's `d` among them) or the store failed over. A stream can be
        # gone, or back without its latest entries (a replica promoted before it had them): with no new entry, the
        # continuity check would only notice at the next one.
        probe = sweep and (backend.cluster or self._fresh)
        pipe = backend._redis.pipeline(transaction=False)
        if backend.cluster:
            for key in wanted:
                pipe.xread({key: positions[keys[key]]}, count=_READ_COUNT)
        else:
            pipe.xread({key: positions[keys[key]] for key in wanted}, count=_READ_COUNT)
        if probe:
            for key in wanted:
                position = positions[keys[key]]
                pipe.xrange(key, position, position)
        raw = await backend._call(pipe.execute())
        streams: dict[str, Any] = {}  # stream key → its entries
        replies = raw[: len(wanted)] if backend.cluster else raw[:1]
        for reply in replies:
            if reply:  # RESP2: [[key, entries], ...]; RESP3: {key: entries}
                streams.update(reply.items() if isinstance(reply, dict) else ((k, v) for k, v in reply))
        held = raw[len(replies) :]
        for i, key in enumerate(wanted):
            channel = keys[key]
            if entries := streams.get(key):
                out.entries[channel] = [_entry(e) for e in entries]
                if len(entries) >= _READ_COUNT:
                    self._rang.add(key)  # more is waiting: read on at once
            elif probe and not held[i] and positions[channel] != ZERO_ID:
                # It held the position (the entry delivered last) and no longer does: deleted while its ring was lost,
                # expired, or lost by a failover, whole or its latest entries. Its streams end and resume, and the
                # store tells each why.
                out.vanished.append(channel)
        if sweep:
            self._fresh = False

    async def _subscribe(self, keys: Mapping[str, str]) -> None:
        """Subscribe each new channel on the connection to the node that owns it; drop the others."""
        redis = self._backend._redis
        cluster = self._backend.cluster
        if cluster:
            await self._learn_slots()
        for key in [k for k in self._subscribed if k not in keys]:
            self._pushed.pop(key, None)
            self._pushed_chars.pop(key, None)
            pubsub = self._pubsubs.get(self._subscribed.pop(key))
            if pubsub is not None:
                await pubsub.sunsubscribe(self._backend.keys.ring(key))
        new: dict[str, list[str]] = {}
        for key in keys:
            if key not in self._subscribed:
                node = redis.get_node_from_key(key).name if cluster else ""
                new.setdefault(node, []).append(key)
        for node_name, node_keys in new.items():
            pubsub = self._pubsubs.get(node_name)
            if pubsub is None:
                pubsub = self._pubsubs[node_name] = await self._open_pubsub(node_name)
            self._unconfirmed.update(node_keys)
            # Counted as subscribed before the command leaves: a ring for a key not in `_subscribed` is dropped.
            for key in node_keys:
                self._subscribed[key] = node_name
                self._rang.add(key)
            rings = [self._backend.keys.ring(key) for key in node_keys]
            if cluster:
                for ring in rings:  # one slot per SSUBSCRIBE
                    await pubsub.ssubscribe(ring)
            else:
                await pubsub.ssubscribe(*rings)
            if not isinstance(pubsub, SubscribingConnection) and node_name not in self._listeners:
                self._listeners[node_name] = asyncio.create_task(self._listen(pubsub), name=f"tail-rings-{node_name}")
        # Read only once every new subscription is in force: an append after that rings, one before it is read now.
        # (SSUBSCRIBE goes on one connection and the read on another; sent is not yet subscribed.)
        while self._unconfirmed:
            self._confirmed.clear()
            async with asyncio.timeout(self._backend._timeout_s):
                await self._confirmed.wait()
            self._check()

    async def _learn_slots(self) -> None:
        redis = self._backend._redis
        if self._remap:
            await redis.nodes_manager.initialize()
            self._remap = False
        await redis.initialize()  # the slot map, learnt on first use (a no-op once known)

    async def _open_pubsub(self, node_name: str) -> Any:
        backend = self._backend
        if not backend.cluster and backend._pipe is not None:
            # Rings are parsed as they arrive, many per read, and handled in place: no task wakes per message.
            return SubscribingConnection(await backend._pipe.open(self._on_push, self._on_lost))
        # Otherwise redis-py's PubSub, read by a task of its own (`_listen`). Keepalive, so that a silently dead
        # connection is noticed, not left to the sweep.
        ours = {**client_kwargs(backend._timeout_s), "socket_keepalive": True}
        if not backend.cluster:
            return backend._target.pubsub(backend._redis, **ours)
        # The node's own connection settings (password, TLS) from the cluster client, with ours on top.
        node = backend._redis.get_node(node_name=node_name)
        pool = aioredis.ConnectionPool(
            connection_class=node.connection_class, max_connections=1, **{**node.connection_kwargs, **ours}
        )
        return aioredis.Redis(connection_pool=pool).pubsub()

    def _on_message(self, kind: str, ring: str, data: Any) -> None:
        key = self._backend.keys.stream_of_ring(ring)
        if key is None:
            return
        if kind == "smessage":
            if key not in self._subscribed:
                # Unsubscribed (the channel is no longer tailed here; its SUNSUBSCRIBE may still be on its way):
                # nobody on this node reads it, and kept it would be held until the next read, maybe for ever.
                return
            if data == "d":
                self._deleted.append(self._backend.keys.channel_of(key))
            elif key in self._rang:
                pass  # read from the store at the next read anyway, this ring's entries with it
            elif (size := self._pushed_chars.get(key, 0) + len(data)) > _RING_BUFFER_MAX_CHARS:
                self._pushed.pop(key, None)
                self._pushed_chars.pop(key, None)
                self._rang.add(key)
            elif (entries := _ring_entries(data)) is not None:
                self._pushed.setdefault(key, []).extend(entries)
                self._pushed_chars[key] = size
            else:
                self._rang.add(key)
            self._wake.set()
        elif kind == "ssubscribe":
            self._unconfirmed.discard(key)
            if not self._unconfirmed:
                self._confirmed.set()
        elif kind == "sunsubscribe" and key in self._subscribed:
            # Not asked for: the slot moved to another node. Subscribe again where it is now, and read it.
            self._subscribed.pop(key, None)
            self._in_force = None
            self._rang.add(key)
            self._wake.set()

    def _on_push(self, push: list[Any]) -> None:
        if len(push) == 3:
            self._on_message(push[0], push[1], push[2])

    def _on_lost(self, error: BaseException) -> None:
        # The next read raises it and starts afresh.
        self._failure = error
        self._wake.set()
        self._confirmed.set()

    async def _listen(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    self._on_message(message["type"], message["channel"], message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._on_lost(e)

    async def _reset(self) -> None:
        for task in self._listeners.values():
            task.cancel()
        await asyncio.gather(*self._listeners.values(), return_exceptions=True)
        for pubsub in self._pubsubs.values():
            with contextlib.suppress(Exception):  # being thrown away; its own errors do not matter
                await pubsub.aclose()
        self._listeners.clear()
        self._pubsubs.clear()
        self._subscribed.clear()
        self._rang.clear()
        self._pushed.clear()
        self._pushed_chars.clear()
        self._unconfirmed.clear()
        self._in_force = None
        self._next_sweep = 0.0  # the first read after this one reads every channel
        self._fresh = True
        self._failure = None
        self._remap = True

    async def interrupt(self) -> None:
        self._interrupted = True
        self._wake.set()

    @property
    def subscribed(self) -> int:
        """How many channels this reader holds subscriptions for."""
        return len(self._subscribed)

    @property
    def buffered_chars(self) -> int:
        """The characters of the rings held for the next read."""
        return sum(self._pushed_chars.values())

    async def aclose(self) -> None:
        await self._reset()


def _ring_entries(data: str) -> list[Entry] | None:
    """The entries a ring carries (see scripts/append.lua), each with its `prev`; None for a ring that carries none."""
    if not data.startswith("["):
        return None
    try:
        raw = orjson.loads(data)
        prev, close = raw[0], raw[1] == "1"
        n = (len(raw) - 2) // 3
        entries = []
        for i in range(n):
            entry_id, event, payload = raw[2 + 3 * i : 5 + 3 * i]
            entries.append(Entry(entry_id, event, payload, close and i == n - 1, prev))
            prev = entry_id
    except (orjson.JSONDecodeError, TypeError, ValueError, IndexError):
        return None  # read from the stream instead
    return entries or None
