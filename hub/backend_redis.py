"""RedisBackend: one Redis Stream per channel; appends and history reads are Lua scripts, so each is atomic.

Key layout (the only place that builds keys): `<prefix>ch:{<channel>}` per channel (the hash tag keeps a channel on
one cluster slot), beside it `<prefix>fence:{<channel>}` and `<prefix>idem:{<channel>}:<key>`, and `<prefix>control`,
a short stream through which deletions reach every node's tail reader.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .backend import (
    DEFAULT_IDEMPOTENCY_WINDOW_S,
    MAX_KEY,
    TRIM_SLACK_MAX,
    ZERO_ID,
    AppendBatch,
    Appended,
    BackendError,
    BackendUnavailable,
    ChannelClosed,
    ChannelInfo,
    Entry,
    Fenced,
    Idempotency,
    IdempotencyConflict,
    NewEvent,
    RangeResult,
    ReadResult,
    format_id,
)
from .redis_client import client_kwargs, redis_call, redis_client

__all__ = ["RedisBackend"]

log = logging.getLogger(__name__)

_CONTROL_MAXLEN = 1000
_MAX_ID = format_id(MAX_KEY)
# Entries per channel one tail read may return; the rest comes with the next read, in order.
_READ_COUNT = 200

# Reject appends to a closed channel and add the events in one atomic step, so no node can append after the end marker.
# Trimming is done here rather than with `XADD MAXLEN ~`, because Redis does not record what trimming removed, and
# resuming clients must be told exactly when their position fell off the history: after trimming, the id of the newest
# removed entry is stored with `XSETID ... MAXDELETEDID`. Like `~`, it trims in batches (slack) to stay cheap.
# Each entry also stores `p`, the id before it, so the live tail can prove it skipped nothing.
# With a fence (producers only; see backend.Fence) the writer must hold, or may take, the channel's fence hash.
# With an idempotency key (publishers; see backend.Idempotency), a key seen within its window answers the ids it was
# given, as `=` then the ids, and appends nothing; it is checked first, so the retry of a closing append is answered.
# KEYS[1] stream, KEYS[2] fence, KEYS[3] idempotency key (each used only when its mode says so); ARGV: maxlen,
# ttl_ms, close flag ("1"/"0"), fence mode ("", "take", "check"), fence owner, fence attempt, idempotency fingerprint
# ("": none), idempotency window ms, then event/data pairs.
_APPEND_LUA = """
if ARGV[7] ~= '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, ' ', 1, true)
    if string.sub(seen, 1, sep - 1) ~= ARGV[7] then
      return redis.error_reply('IDEMPOTENCY the key was used for other events')
    end
    local out = {'='}
    for id in string.gmatch(string.sub(seen, sep + 1), '[^ ]+') do out[#out + 1] = id end
    return out
  end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local f = last[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'c' then return redis.error_reply('CLOSED channel is closed') end
  end
end
if ARGV[4] ~= '' then
  local held = redis.call('HMGET', KEYS[2], 'o', 'a')
  local attempt = tonumber(ARGV[6])
  if ARGV[4] == 'take' then
    if held[1] and (held[1] ~= ARGV[5] or tonumber(held[2]) > attempt) then
      return redis.error_reply('FENCED another run holds the channel')
    end
    redis.call('HSET', KEYS[2], 'o', ARGV[5], 'a', attempt)
  elseif held[1] ~= ARGV[5] or tonumber(held[2]) ~= attempt then
    return redis.error_reply('FENCED another run holds the channel')
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local ids = {}
local prev = '0-0'
if #last > 0 then prev = last[1][1] end
local n = (#ARGV - 8) / 2
for i = 1, n do
  local ev, d = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  if i == n and ARGV[3] == '1' then
    prev = redis.call('XADD', KEYS[1], '*', 'e', ev, 'd', d, 'p', prev, 'c', '1')
  else
    prev = redis.call('XADD', KEYS[1], '*', 'e', ev, 'd', d, 'p', prev)
  end
  ids[i] = prev
end
local maxlen = tonumber(ARGV[1])
local excess = redis.call('XLEN', KEYS[1]) - maxlen
if excess >= math.min(TRIM_SLACK, maxlen) then
  local gone = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
  redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
  redis.call('XSETID', KEYS[1], ids[n], 'MAXDELETEDID', gone[#gone][1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[3], ARGV[7] .. ' ' .. table.concat(ids, ' '), 'PX', ARGV[8])
end
return ids
""".replace("TRIM_SLACK", str(TRIM_SLACK_MAX))

# History after a position plus the metadata `check_position` needs, read atomically. Flagged read-only, so it runs
# while writes are paused (CLIENT PAUSE WRITE during a failover) and on replicas.
# KEYS[1] stream; ARGV[1] exclusive start ("(<id>"), ARGV[2] count (0: metadata only).
_RANGE_LUA = """#!lua flags=no-writes
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local length, last_id, max_deleted, first, last_entry = 0, '0-0', '0-0', false, false
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'length' then length = info[i + 1]
  elseif k == 'last-generated-id' then last_id = info[i + 1]
  elseif k == 'max-deleted-entry-id' then max_deleted = info[i + 1]
  elseif k == 'first-entry' then first = info[i + 1]
  elseif k == 'last-entry' then last_entry = info[i + 1] end
end
local closed, first_id = 0, ''
if first then first_id = first[1] end
if last_entry then
  local f = last_entry[2]
  for j = 1, #f, 2 do if f[j] == 'c' then closed = 1 end end
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
end
return {1, length, last_id, max_deleted, first_id, closed, entries}
"""

# Delete a channel (and its fence) and tell every node's tail reader, in one step.
# KEYS[1] stream, KEYS[2] control stream, KEYS[3] fence; ARGV[1] channel name, ARGV[2] control maxlen.
_DELETE_LUA = """
redis.call('DEL', KEYS[3])
local n = redis.call('DEL', KEYS[1])
if n == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'op', 'delete', 'ch', ARGV[1])
end
return n
"""


def _bulk(value: str) -> bytes:
    """One RESP bulk string."""
    b = value.encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _entry(raw: Any) -> Entry:
    entry_id, fields = raw[0], raw[1]
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return Entry(entry_id, fields.get("e", "message"), fields.get("d", ""), "c" in fields, fields.get("p"))


class RedisBackend:
    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        history: int,
        ttl_s: float,
        timeout_s: float = 5.0,
        max_connections: int = 32,
        idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._history = history
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._idempotency_ms = max(1, int(idempotency_window_s * 1000))
        self._timeout_s = timeout_s
        self._redis = redis_client(url, timeout_s=timeout_s, max_connections=max_connections)
        self._version_checked = False
        self._append = self._redis.register_script(_APPEND_LUA)
        self._range = self._redis.register_script(_RANGE_LUA)
        self._delete = self._redis.register_script(_DELETE_LUA)

    def stream_key(self, channel: str) -> str:
        return f"{self._prefix}ch:{{{channel}}}"

    def channel_of(self, key: str) -> str:
        """The channel of a stream key (the inverse of stream_key)."""
        return key[len(self._prefix) + 4 : -1]

    @property
    def control_key(self) -> str:
        return f"{self._prefix}control"

    async def _call(self, coro: Any) -> Any:
        """Run one Redis call with a deadline; map every Redis failure to BackendUnavailable (a 503).

        Error replies such as OOM, READONLY (after a failover) or MISCONF are the store refusing work, not a client
        mistake; the errors the append script raises on purpose become ChannelClosed and Fenced.
        """
        try:
            return await redis_call(coro, self._timeout_s)
        except BackendUnavailable as e:
            if isinstance(reply := e.__cause__, ResponseError):
                if str(reply).startswith("CLOSED"):
                    raise ChannelClosed(str(reply)) from None
                if str(reply).startswith("FENCED"):
                    raise Fenced(str(reply)) from None
                if str(reply).startswith("IDEMPOTENCY"):
                    raise IdempotencyConflict(str(reply)) from None
                log.warning("redis refused a command: %s", reply)
            raise

    def fence_key(self, channel: str) -> str:
        return f"{self._prefix}fence:{{{channel}}}"

    def idempotency_key(self, channel: str, key: str) -> str:
        return f"{self._prefix}idem:{{{channel}}}:{key}"

    def _append_call(self, b: AppendBatch, idempotency: Idempotency | None = None) -> tuple[list[str], list[Any]]:
        keys = [self.stream_key(b.channel)]
        args: list[Any] = [self._history, self._ttl_ms, "1" if b.close else "0"]
        if b.fence is None:
            args += ("", "", 0)
        else:
            keys.append(self.fence_key(b.channel))
            args += ("take" if b.fence.take else "check", b.fence.owner, b.fence.attempt)
        if idempotency is None:
            args += ("", 0)
        else:
            # Declared keys must be passed in order (and in one slot): the fence's, even if unused, comes before.
            keys[1:] = [self.fence_key(b.channel), self.idempotency_key(b.channel, idempotency.key)]
            args += (idempotency.fingerprint, self._idempotency_ms)
        for ev in b.events:
            args += (ev.event, ev.data)
        return keys, args

    async def append(self, channel: str, events: Sequence[NewEvent], *, close: bool = False) -> list[str]:
        keys, args = self._append_call(AppendBatch(channel, events, close))
        ids = await self._call(self._append(keys=keys, args=args))
        return list(ids)

    async def append_once(
        self, channel: str, events: Sequence[NewEvent], idempotency: Idempotency, *, close: bool = False
    ) -> Appended:
        keys, args = self._append_call(AppendBatch(channel, events, close), idempotency)
        ids = list(await self._call(self._append(keys=keys, args=args)))
        if ids and ids[0] == "=":
            return Appended(ids[1:], True)
        return Appended(ids, False)

    async def append_many(self, batches: Sequence[AppendBatch]) -> list[list[str] | BackendError]:
        if not batches:
            return []
        if len(batches) == 1:
            # One script call needs no pipeline (common at low load, and the one-by-one baseline).
            keys, args = self._append_call(batches[0])
            try:
                return [list(await self._call(self._append(keys=keys, args=args)))]
            except BackendError as e:
                return [e]
        # One pipeline, one round trip; each script call stays atomic on its own. Not a transaction: one refused
        # channel (closed) must not refuse the others.
        pipe = self._redis.pipeline(transaction=False)
        for b in batches:
            keys, args = self._append_call(b)
            await self._append(keys=keys, args=args, client=pipe)
        raw = await self._call(pipe.execute(raise_on_error=False))
        results: list[list[str] | BackendError] = []
        for r in raw:
            if isinstance(r, ResponseError) and str(r).startswith("CLOSED"):
                results.append(ChannelClosed(str(r)))
            elif isinstance(r, ResponseError) and str(r).startswith("FENCED"):
                results.append(Fenced(str(r)))
            elif isinstance(r, Exception):
                results.append(BackendUnavailable(f"redis error: {str(r).split(' ', 1)[0]}"))
            else:
                results.append(list(r))
        return results

    async def range(self, channel: str, after: str, *, limit: int) -> RangeResult:
        # Redis cannot express "after the largest id" as an exclusive start; nothing can follow it anyway.
        count = 0 if after == _MAX_ID else limit + 1
        raw = await self._call(self._range(keys=[self.stream_key(channel)], args=[f"({after}", count]))
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
        raw = await self._call(self._range(keys=[self.stream_key(channel)], args=["(0-0", 0]))
        if raw[0] == 0:
            return None
        _, length, last_id, _max_deleted, first_id, closed, _ = raw
        return ChannelInfo(length=int(length), first_id=first_id or None, last_id=last_id, closed=bool(closed))

    async def delete(self, channel: str) -> bool:
        keys = [self.stream_key(channel), self.control_key, self.fence_key(channel)]
        n = await self._call(self._delete(keys=keys, args=[channel, _CONTROL_MAXLEN]))
        return bool(n)

    async def open_reader(self) -> _RedisTailReader:
        reader = _RedisTailReader(self)
        try:
            async with asyncio.timeout(self._timeout_s):
                await reader._prepare()
        except (RedisError, TimeoutError, OSError) as e:
            # Not fatal: a node may start before Redis; the first successful read prepares the reader instead.
            log.warning("live tail not prepared yet (%s); will retry", type(e).__name__)
            await reader._reset()
        return reader

    async def ping(self) -> None:
        if not self._version_checked:
            info = await self._call(self._redis.info("server"))
            version = tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:2] if x.isdigit())
            if version < (7, 0):
                # XSETID MAXDELETEDID and max-deleted-entry-id, which make resets exact, came with Redis 7.0.
                log.error(
                    "Redis %s is too old: the hub needs Redis 7.0 or newer (or Valkey)", info.get("redis_version")
                )
                raise BackendUnavailable("Redis 7.0 or newer is required")
            self._version_checked = True
        await self._call(self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()


class _RedisTailReader:
    """One connection doing `XREAD BLOCK` over the control stream and every active channel of this node.

    `interrupt()` sends `CLIENT UNBLOCK` from the shared pool, so a new channel joins the read at once. The reader
    never reads from `$`: it always passes the last id it delivered, so nothing appended between two reads is lost.
    """

    def __init__(self, backend: RedisBackend) -> None:
        self._backend = backend
        # Typed as Any: redis-py's stubs do not model decode_responses=True, and this parses replies itself.
        self._conn: Any = aioredis.Redis.from_url(
            backend._url, single_connection_client=True, **client_kwargs(backend._timeout_s)
        )
        self._client_id: int | None = None
        self._control_pos: str | None = None
        self._reading = False
        self._interrupting = False
        # channel → its stream key encoded for the wire once, and its last position with that position encoded (most
        # channels have not moved since the previous read)
        self._bulks: dict[str, tuple[bytes, str, bytes]] = {}

    async def _prepare(self) -> None:
        if self._client_id is None:
            self._client_id = int(await self._conn.execute_command("CLIENT", "ID"))
        if self._control_pos is None:
            # The control stream's current end: deletions before this reader existed are not its business.
            last = await self._conn.xrevrange(self._backend.control_key, count=1)
            self._control_pos = last[0][0] if last else ZERO_ID

    async def read(self, positions: Mapping[str, str], *, block_s: float) -> ReadResult:
        backend = self._backend
        self._reading = True
        try:
            async with asyncio.timeout(block_s + backend._timeout_s):
                await self._prepare()
                assert self._control_pos is not None
                # The command is packed here rather than by redis-py: a node tailing thousands of channels sends
                # them all on every read, and building that argument list was most of the tail's CPU. Keys are
                # encoded once per channel, positions again only when they moved.
                bulks = self._bulks
                if len(bulks) > 2 * len(positions) + 64:
                    self._bulks = bulks = {c: b for c, b in bulks.items() if c in positions}
                keys: list[bytes] = []
                ids: list[bytes] = []
                for channel, pos in positions.items():
                    cached = bulks.get(channel)
                    if cached is None:
                        cached = bulks[channel] = (_bulk(backend.stream_key(channel)), pos, _bulk(pos))
                    elif cached[1] != pos:
                        cached = bulks[channel] = (cached[0], pos, _bulk(pos))
                    keys.append(cached[0])
                    ids.append(cached[2])
                block_ms = str(max(1, int(block_s * 1000)))
                command = [
                    b"*%d\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n%s$5\r\nBLOCK\r\n%s$7\r\nSTREAMS\r\n%s"
                    % (6 + 2 * (len(keys) + 1), _bulk(str(_READ_COUNT)), _bulk(block_ms), _bulk(backend.control_key)),
                    *keys,
                    _bulk(self._control_pos),
                    *ids,
                ]
                conn = self._conn.connection
                await conn.send_packed_command(command, check_health=False)
                raw = await conn.read_response()
        except (RedisError, TimeoutError, OSError) as e:
            # Any failure, error replies included, drops the connection: a fresh one starts from a known state.
            await self._reset()
            raise BackendUnavailable(f"redis unavailable: {type(e).__name__}: {e}") from e
        finally:
            self._reading = False
        result = ReadResult()
        if not raw:
            return result
        # RESP2 gives [[key, entries], ...]; RESP3 a mapping.
        items = raw.items() if isinstance(raw, dict) else raw
        control = backend.control_key
        for key, entries in items:
            if key == control:
                for entry_id, fields in entries:
                    self._control_pos = entry_id
                    if isinstance(fields, list):
                        fields = dict(zip(fields[::2], fields[1::2], strict=True))
                    if fields.get("op") == "delete" and "ch" in fields:
                        result.deleted.append(fields["ch"])
            else:
                result.entries[backend.channel_of(key)] = [_entry(e) for e in entries]
        return result

    async def _reset(self) -> None:
        self._client_id = None
        try:
            await self._conn.connection.disconnect() if self._conn.connection else None
        except Exception:  # the connection is being thrown away; its own errors do not matter
            log.debug("error while dropping the tail connection", exc_info=True)

    async def interrupt(self) -> None:
        """Unblock a pending XREAD. The command may not have reached Redis yet, so retry briefly until it has."""
        if self._interrupting:
            return
        self._interrupting = True
        try:
            for _ in range(400):
                if not self._reading:
                    return
                client_id = self._client_id
                if client_id is not None and await self._backend._call(self._backend._redis.client_unblock(client_id)):
                    return
                await asyncio.sleep(0.005)
        finally:
            self._interrupting = False

    async def aclose(self) -> None:
        await self._conn.aclose()
