"""RedisJobQueue: jobs on a Redis Stream read through a consumer group; each generation's record in a hash.

Keys (built only here): `<prefix>jobs` (the built-in providers' stream; `j` the job, `o` its owner),
`{<prefix>jobs}:<name>` (the stream of a provider named in a providers file: only workers that have it read it),
`<prefix>gen:{<id>}` (hash: `r` the record as JSON, `n` its attempts, `o` its owner, `cancel`),
`<prefix>active:{<owner>}` (sorted set: the owner's generations queued or running, scored by when the slot lapses).
Claims are kept fresh with `XCLAIM … JUSTID`; a dead worker's jobs are taken over with `XAUTOCLAIM`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import asdict, replace
from typing import Any

import orjson
from redis.exceptions import ResponseError

from . import scripts
from .backend import BackendUnavailable, NotReplicated
from .jobs import BUILTIN_QUEUE, TERMINAL_STATUSES, Delivery, GenerationRecord, Job, TooManyGenerations
from .redis_client import RedisTarget, connect, redis_call
from .rediskeys import RedisKeys

__all__ = ["DEFAULT_GROUP", "RedisJobQueue"]

# The job stream's consumer group, the workers' (`python -m producer --group`); hub nodes only add to the stream.
DEFAULT_GROUP = "producers"

log = logging.getLogger(__name__)

# Released jobs are marked idle for this long, so any worker's next XAUTOCLAIM takes them at once.
_RELEASED_IDLE_MS = 1_000_000_000


# ssecore/scripts/*.lua: claims renewed for the jobs still held, and the per-client slots of running generations.
_RENEW_LUA = scripts.load("renew")
_KEEP_SLOT_LUA = scripts.load("keep_slot")
_TAKE_SLOT_LUA = scripts.load("take_slot")


def _record(raw: Any, attempts: Any = None, owner: Any = None) -> GenerationRecord | None:
    if raw is None:
        return None
    record = GenerationRecord.from_dict(orjson.loads(raw))
    record.attempts = int(attempts or 0)
    record.owner = owner
    return record


def _record_json(record: GenerationRecord) -> bytes:
    # The attempt count and the owner have fields of their own: only begin_attempt changes the one, only submit
    # writes the other, and a record without them reads as before owners were kept.
    body = asdict(record)
    del body["owner"]
    if body["message"] is None:
        del body["message"]  # a record without one reads the same to a node that predates messages
    return orjson.dumps({**body, "attempts": 0})


class RedisJobQueue:
    def __init__(
        self,
        url: str | RedisTarget,
        *,
        prefix: str,
        group: str,
        record_ttl_s: float,
        timeout_s: float = 5.0,
        cluster: bool = False,
        replicas: int = 0,
        replicas_timeout_s: float = 1.0,
        providers: Collection[str] = (),
    ) -> None:
        """`providers`: the named (providers-file) providers whose jobs this worker takes, beside the built-ins'."""
        self._replicas = replicas
        self._wait_ms = max(1, int(replicas_timeout_s * 1000))
        self.keys = RedisKeys(prefix)
        self._group = group
        self._ttl_s = max(1, int(record_ttl_s))
        self._timeout_s = timeout_s
        self._cluster = cluster
        self._redis, self._gate = connect(url, cluster=cluster, timeout_s=timeout_s, max_connections=16)
        self._renew = self._redis.register_script(_RENEW_LUA)
        self._take_slot = self._redis.register_script(_TAKE_SLOT_LUA)
        self._group_ready = False
        # Stream key -> its queue's name in entry ids ("" for the built-in one); then each stream's XAUTOCLAIM cursor.
        self._streams = {self.keys.jobs: ""} | {
            self.keys.provider_jobs(p): p for p in sorted(set(providers) - BUILTIN_QUEUE)
        }
        self._claim_cursors = dict.fromkeys(self._streams, "0-0")
        self._claim_turn = 0

    def _stream_of(self, provider: str) -> str:
        return self.keys.jobs if provider in BUILTIN_QUEUE else self.keys.provider_jobs(provider)

    def _split(self, entry_id: str) -> tuple[str, str]:
        """The stream and the stream id of an entry id: a named provider's entries are `<name>/<id>`."""
        name, _, stream_id = entry_id.rpartition("/")
        return (self.keys.provider_jobs(name) if name else self.keys.jobs), stream_id

    def _by_stream(self, entry_ids: Sequence[str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for entry_id in entry_ids:
            stream, stream_id = self._split(entry_id)
            grouped.setdefault(stream, []).append(stream_id)
        return grouped

    def _entry_id(self, stream: str, stream_id: str) -> str:
        name = self._streams.get(stream, "")
        return f"{name}/{stream_id}" if name else stream_id

    async def _call(self, coro: Any, timeout_s: float | None = None) -> Any:
        try:
            return await redis_call(coro, timeout_s or self._timeout_s, self._gate)
        except BackendUnavailable as e:
            if isinstance(e.__cause__, ResponseError) and "NOGROUP" in str(e.__cause__):
                # The stream or its group is gone (Redis restarted empty, or flushed): create them again.
                self._group_ready = False
            raise

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        for stream in self._streams:
            try:
                # From 0: jobs submitted before any worker existed are still served.
                await self._call(self._redis.xgroup_create(stream, self._group, id="0", mkstream=True))
            except BackendUnavailable as e:
                if not (isinstance(e.__cause__, ResponseError) and "BUSYGROUP" in str(e.__cause__)):
                    raise
        self._group_ready = True

    async def submit(self, job: Job, *, max_active: int = 0) -> GenerationRecord:
        record = GenerationRecord.queued(job)
        limited = max_active > 0 and job.owner is not None
        if limited:
            assert job.owner is not None
            args = [max_active, self._ttl_s * 1000, job.id]
            if not await self._call(self._take_slot(keys=[self.keys.active(job.owner)], args=args)):
                raise TooManyGenerations(max_active)
        try:
            await self._enqueue(job, record)
        except Exception:
            if limited:
                with contextlib.suppress(BackendUnavailable):  # else it lapses
                    await self._free_slot(record)
            raise
        return record

    async def _free_slot(self, record: GenerationRecord) -> None:
        if record.owner is not None:
            await self._call(self._redis.zrem(self.keys.active(record.owner), record.id))

    async def _enqueue(self, job: Job, record: GenerationRecord) -> None:
        # On a cluster the record and the job queue are in different slots, and no transaction spans slots: the
        # record goes first, so a worker never takes a job without one. If the job then fails, the submit is a 503
        # and the record, never handed out, expires.
        pipe = self._redis.pipeline(transaction=not self._cluster)
        fields = {"r": _record_json(record)} | ({"o": job.owner} if job.owner is not None else {})
        pipe.hset(self.keys.record(job.id), mapping=fields)
        pipe.expire(self.keys.record(job.id), self._ttl_s)
        if self._cluster:
            await self._call(pipe.execute())
            pipe = self._redis.pipeline(transaction=False)
        job_fields = {"j": job.dumps()} | ({"o": job.owner} if job.owner is not None else {})
        pipe.xadd(self._stream_of(job.provider), job_fields)
        await self._call(pipe.execute())
        if self._replicas:
            await self._replicated(self.keys.record(job.id))

    async def _replicated(self, key: str) -> None:
        """Return once the replicas required hold every write made so far, or raise NotReplicated.

        WAIT counts the replicas holding its connection's last write. A pooled connection's last write may be older
        than ours, so it first writes one of its own (the record's expiry, set again to the same): then WAIT covers
        everything before it, ours included.
        """
        pipe = self._redis.pipeline(transaction=False)
        pipe.expire(key, self._ttl_s)
        pipe.execute_command("WAIT", self._replicas, self._wait_ms)
        _, acked = await self._call(pipe.execute())
        if acked < self._replicas:
            raise NotReplicated(self._replicas, acked)

    async def get(self, generation_id: str) -> GenerationRecord | None:
        raw, attempts, owner = await self._call(self._redis.hmget(self.keys.record(generation_id), "r", "n", "o"))
        return _record(raw, attempts, owner)

    async def begin_attempt(self, generation_id: str) -> int:
        return int(await self._call(self._redis.hincrby(self.keys.record(generation_id), "n", 1)))

    async def request_cancel(self, generation_id: str) -> GenerationRecord | None:
        record = await self.get(generation_id)
        if record is not None:
            await self._call(self._redis.hset(self.keys.record(generation_id), "cancel", "1"))
        return record

    async def _deliveries(self, stream: str, entries: Any, *, restarted: bool) -> list[Delivery]:
        out: list[Delivery] = []
        for stream_id, fields in entries or []:
            entry_id = self._entry_id(stream, stream_id)
            if not fields or "j" not in fields:
                continue  # deleted while pending
            try:
                job = Job.loads(fields["j"])
                out.append(Delivery(replace(job, owner=fields.get("o")), entry_id, restarted))
            except (orjson.JSONDecodeError, TypeError, ValueError) as e:
                # Never readable by any worker: acknowledged, or it would be handed round for ever.
                log.error("dropping unreadable job %s: %s", entry_id, e)
                await self.ack(entry_id)
        return out

    async def fetch(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        await self._ensure_group()
        raw = await self._call(
            # COUNT is per stream: shared out, so that all of them together hand out no more than `count` (or, when
            # fewer than one each is free, one more per stream).
            self._redis.xreadgroup(
                self._group,
                consumer,
                dict.fromkeys(self._streams, ">"),
                count=max(1, count // len(self._streams)),
                block=max(1, int(block_s * 1000)),
            ),
            timeout_s=block_s + self._timeout_s,
        )
        if not raw:
            return []
        items = raw.items() if isinstance(raw, dict) else raw
        out: list[Delivery] = []
        for key, entries in items:
            out += await self._deliveries(key, entries, restarted=False)
        return out

    async def claim_stale(self, consumer: str, min_idle_s: float, count: int) -> list[Delivery]:
        await self._ensure_group()
        out: list[Delivery] = []
        # A different stream first each round, so a busy one does not keep the others' stale jobs waiting.
        streams = list(self._streams)
        self._claim_turn = (self._claim_turn + 1) % len(streams)
        for stream in streams[self._claim_turn :] + streams[: self._claim_turn]:
            if len(out) >= count:
                break
            raw = await self._call(
                self._redis.xautoclaim(
                    stream,
                    self._group,
                    consumer,
                    int(min_idle_s * 1000),
                    start_id=self._claim_cursors[stream],
                    count=count - len(out),
                )
            )
            self._claim_cursors[stream] = raw[0] if raw and raw[0] else "0-0"
            deleted = raw[2] if len(raw) > 2 else []
            if deleted:
                await self._call(self._redis.xack(stream, self._group, *deleted))
            out += await self._deliveries(stream, raw[1], restarted=True)
        return out

    async def renew(self, consumer: str, entry_ids: Sequence[str]) -> list[str]:
        lost: list[str] = []
        for stream, ids in self._by_stream(entry_ids).items():
            gone = await self._call(self._renew(keys=[stream], args=[self._group, consumer, *ids]))
            lost += [self._entry_id(stream, i) for i in gone]
        return lost

    async def release(self, consumer: str, entry_ids: Sequence[str]) -> None:
        for stream, ids in self._by_stream(entry_ids).items():
            await self._call(
                self._redis.xclaim(stream, self._group, consumer, 0, ids, idle=_RELEASED_IDLE_MS, justid=True)
            )

    async def ack(self, entry_id: str) -> None:
        stream, stream_id = self._split(entry_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xack(stream, self._group, stream_id)
        pipe.xdel(stream, stream_id)
        await self._call(pipe.execute())

    async def update(self, record: GenerationRecord) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self.keys.record(record.id), "r", _record_json(record))
        pipe.expire(self.keys.record(record.id), self._ttl_s)
        if record.owner is not None:
            # The end of a generation, however it came, frees its owner's slot; a running one keeps it for as long
            # as its record lives. (A no-op for a generation that took no slot.)
            active = self.keys.active(record.owner)
            if record.status in TERMINAL_STATUSES:
                pipe.zrem(active, record.id)
            else:
                pipe.eval(_KEEP_SLOT_LUA, 1, active, self._ttl_s * 1000, record.id)
        await self._call(pipe.execute())

    async def cancel_requested(self, generation_ids: Sequence[str]) -> set[str]:
        if not generation_ids:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for g in generation_ids:
            pipe.hget(self.keys.record(g), "cancel")
        flags = await self._call(pipe.execute())
        return {g for g, flag in zip(generation_ids, flags, strict=True) if flag}

    async def aclose(self) -> None:
        await self._redis.aclose()
