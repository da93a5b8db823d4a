"""RedisTailReader: a node's live tail over Redis, fed by the rings its store's appends send (see scripts/append.lua).

It reads through a TailSource the store hands it: the client, the key names, the call deadline and a way to open a
subscribing connection. It never reaches into the store itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import RedisClusterException, RedisError

from .backend import ZERO_ID, BackendUnavailable, Entry, ReadResult, parse_id
from .redis_pipe import LostHandler, PushHandler, SubscribingConnection
from .rediskeys import RedisKeys

__all__ = ["RedisTailReader", "TailSource", "stream_entry"]

# Entries per channel one tail read may return; the rest comes with the next read, in order.
_READ_COUNT = 200
# What the rings of one channel may hold between two tail reads, in characters of their text (counted as they come,
# without encoding them again; a character of it takes 1 to 4 bytes). Past it they are dropped and the channel is
# read from the store instead: a burst, or a reader that is not being read, costs a read, not memory without bound.
_RING_BUFFER_MAX_CHARS = 2 * 1024 * 1024


def stream_entry(raw: Any) -> Entry:
    """An entry as Redis returns it (`[id, [field, value, ...]]` or a mapping of fields) as an Entry."""
    entry_id, fields = raw[0], raw[1]
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return Entry(entry_id, fields.get("e", "message"), fields.get("d", ""), "c" in fields, fields.get("p"))


@dataclass(frozen=True, slots=True)
class TailSource:
    """What the live tail reads through, from the store: nothing more."""

    redis: Any  # the store's client: pipelines of XREAD (and, on a cluster, its map of nodes and slots)
    keys: RedisKeys
    cluster: bool
    timeout_s: float  # one call's deadline
    call: Callable[[Awaitable[Any]], Awaitable[Any]]  # a call within the deadline, failures as BackendUnavailable
    # A subscribing connection to a node (the single Redis: ""): a SubscribingConnection, which hands each push to
    # the first handler as it is parsed, or a redis-py PubSub, which the reader listens to with a task of its own.
    open_subscriber: Callable[[str, PushHandler, LostHandler], Awaitable[Any]]


class RedisTailReader:
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

    def __init__(self, source: TailSource) -> None:
        self._source = source
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
        source = self._source
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_s
        keys = self._keys_of(positions)
        try:
            async with asyncio.timeout(block_s + source.timeout_s):
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
                key = cache[channel] = self._source.keys.stream(channel)
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
        source = self._source
        # Whether a stream that returned nothing still holds the position delivered last: on a cluster at every sweep
        # (a stream may expire, or be lost by a failover, while its subscribers wait), on a single Redis at the first
        # sweep after rings may have been lost (a deletion's `d` among them) or the store failed over. A stream can be
        # gone, or back without its latest entries (a replica promoted before it had them): with no new entry, the
        # continuity check would only notice at the next one.
        probe = sweep and (source.cluster or self._fresh)
        pipe = source.redis.pipeline(transaction=False)
        if source.cluster:
            for key in wanted:
                pipe.xread({key: positions[keys[key]]}, count=_READ_COUNT)
        else:
            pipe.xread({key: positions[keys[key]] for key in wanted}, count=_READ_COUNT)
        if probe:
            for key in wanted:
                position = positions[keys[key]]
                pipe.xrange(key, position, position)
        raw = await source.call(pipe.execute())
        streams: dict[str, Any] = {}  # stream key → its entries
        replies = raw[: len(wanted)] if source.cluster else raw[:1]
        for reply in replies:
            if reply:  # RESP2: [[key, entries], ...]; RESP3: {key: entries}
                streams.update(reply.items() if isinstance(reply, dict) else ((k, v) for k, v in reply))
        held = raw[len(replies) :]
        for i, key in enumerate(wanted):
            channel = keys[key]
            if entries := streams.get(key):
                out.entries[channel] = [stream_entry(e) for e in entries]
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
        redis = self._source.redis
        cluster = self._source.cluster
        if cluster:
            await self._learn_slots()
        for key in [k for k in self._subscribed if k not in keys]:
            self._pushed.pop(key, None)
            self._pushed_chars.pop(key, None)
            pubsub = self._pubsubs.get(self._subscribed.pop(key))
            if pubsub is not None:
                await pubsub.sunsubscribe(self._source.keys.ring(key))
        new: dict[str, list[str]] = {}
        for key in keys:
            if key not in self._subscribed:
                node = redis.get_node_from_key(key).name if cluster else ""
                new.setdefault(node, []).append(key)
        for node_name, node_keys in new.items():
            pubsub = self._pubsubs.get(node_name)
            if pubsub is None:
                opened = await self._source.open_subscriber(node_name, self._on_push, self._on_lost)
                pubsub = self._pubsubs[node_name] = opened
            self._unconfirmed.update(node_keys)
            # Counted as subscribed before the command leaves: a ring for a key not in `_subscribed` is dropped.
            for key in node_keys:
                self._subscribed[key] = node_name
                self._rang.add(key)
            rings = [self._source.keys.ring(key) for key in node_keys]
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
            async with asyncio.timeout(self._source.timeout_s):
                await self._confirmed.wait()
            self._check()

    async def _learn_slots(self) -> None:
        redis = self._source.redis
        if self._remap:
            await redis.nodes_manager.initialize()
            self._remap = False
        await redis.initialize()  # the slot map, learnt on first use (a no-op once known)

    def _on_message(self, kind: str, ring: str, data: Any) -> None:
        key = self._source.keys.stream_of_ring(ring)
        if key is None:
            return
        if kind == "smessage":
            if key not in self._subscribed:
                # Unsubscribed (the channel is no longer tailed here; its SUNSUBSCRIBE may still be on its way):
                # nobody on this node reads it, and kept it would be held until the next read, maybe for ever.
                return
            if data == "d":
                self._deleted.append(self._source.keys.channel_of(key))
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
