"""MemoryJobQueue: jobs and their records in this process, for the worker embedded in a hub on the memory backend."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from .jobs import TERMINAL_STATUSES, Delivery, GenerationRecord, Job, TooManyGenerations

__all__ = ["MemoryJobQueue"]

# Finished records are kept this long, then dropped, so the embedded queue does not grow without end.
_RECORD_TTL_S = 3600.0


class MemoryJobQueue:
    def __init__(self) -> None:
        self._pending: list[Delivery] = []
        self._running: dict[str, Delivery] = {}
        self._released: list[Delivery] = []
        self._records: dict[str, GenerationRecord] = {}
        self._cancel: set[str] = set()
        self._finished: deque[tuple[float, str]] = deque()  # (when, id), oldest first
        self._active: dict[str, set[str]] = {}  # owner → its generations queued or running
        self._changed = asyncio.Event()
        self._seq = 0

    async def submit(self, job: Job, *, max_active: int = 0) -> GenerationRecord:
        self._sweep()
        if max_active > 0 and job.owner is not None:
            active = self._active.setdefault(job.owner, set())
            if len(active) >= max_active:
                raise TooManyGenerations(max_active)
            active.add(job.id)
        record = GenerationRecord.queued(job)
        self._records[job.id] = record
        self._seq += 1
        self._pending.append(Delivery(job, f"{self._seq}-0"))
        self._changed.set()
        return replace(record)

    async def get(self, generation_id: str) -> GenerationRecord | None:
        record = self._records.get(generation_id)
        return replace(record) if record is not None else None

    async def request_cancel(self, generation_id: str) -> GenerationRecord | None:
        record = self._records.get(generation_id)
        if record is None:
            return None
        if record.status not in TERMINAL_STATUSES:
            self._cancel.add(generation_id)
        return replace(record)

    async def fetch(self, consumer: str, count: int, block_s: float) -> list[Delivery]:
        if not self._pending:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), block_s)
            except TimeoutError:
                return []
        taken, self._pending = self._pending[:count], self._pending[count:]
        for d in taken:
            self._running[d.entry_id] = d
        return taken

    async def claim_stale(self, consumer: str, min_idle_s: float, count: int) -> list[Delivery]:
        # One process, one worker: a job only comes back here when that worker released it.
        taken, self._released = self._released[:count], self._released[count:]
        for d in taken:
            self._running[d.entry_id] = d
        return taken

    async def renew(self, consumer: str, entry_ids: Sequence[str]) -> list[str]:
        return [e for e in entry_ids if e not in self._running]

    async def begin_attempt(self, generation_id: str) -> int:
        record = self._records.get(generation_id)
        if record is None:
            return 1
        record.attempts += 1
        return record.attempts

    async def release(self, consumer: str, entry_ids: Sequence[str]) -> None:
        for entry_id in entry_ids:
            d = self._running.pop(entry_id, None)
            if d is not None:
                self._released.append(replace(d, restarted=True))

    async def ack(self, entry_id: str) -> None:
        d = self._running.pop(entry_id, None)
        if d is not None:
            self._cancel.discard(d.job.id)
            self._finished.append((time.monotonic(), d.job.id))

    async def update(self, record: GenerationRecord) -> None:
        current = self._records.get(record.id)
        if record.status in TERMINAL_STATUSES and record.owner is not None:
            active = self._active.get(record.owner)
            if active is not None:
                active.discard(record.id)
                if not active:
                    del self._active[record.owner]
        if current is not None:
            # The attempt count is begin_attempt's alone.
            self._records[record.id] = replace(record, attempts=current.attempts)

    async def cancel_requested(self, generation_ids: Sequence[str]) -> set[str]:
        return {g for g in generation_ids if g in self._cancel}

    async def aclose(self) -> None:
        return None

    def _sweep(self) -> None:
        cutoff = time.monotonic() - _RECORD_TTL_S
        while self._finished and self._finished[0][0] < cutoff:
            self._records.pop(self._finished.popleft()[1], None)
