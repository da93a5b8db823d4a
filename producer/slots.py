"""Slots: how many generations a worker may still start, and a wait for room that cannot miss its wake-up.

Room is taken two ways: a running generation holds a slot until it ends, and a claim in flight reserves the slots it
asked for until it returns. Both are given back here and nowhere else, and every give-back wakes whoever waits for
room, so no caller can free room and forget to say so. A waiter also re-checks after a timeout: a wait for room is
bounded, so the loop that waits keeps going round (and can show it goes round) even while the worker is full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

__all__ = ["Slots"]


class Slots:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a worker needs at least one slot")
        self.capacity = capacity
        self._held: set[str] = set()
        self._reserved = 0
        self._room = asyncio.Event()

    @property
    def free(self) -> int:
        """Slots neither held nor reserved. Negative for a moment when a claim lands during a fetch."""
        return self.capacity - len(self._held) - self._reserved

    def hold(self, key: str) -> None:
        """A generation started: it holds a slot until `vacate(key)`."""
        self._held.add(key)

    def vacate(self, key: str) -> None:
        """The generation ended: its slot is free again (a key not held changes nothing)."""
        self._held.discard(key)
        self._freed()

    @contextlib.contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Keep `count` slots for a call in flight (a claim), so that nothing else books them meanwhile."""
        self._reserved += count
        try:
            yield
        finally:
            self._reserved -= count
            self._freed()

    async def wait_for_room(self, timeout_s: float) -> bool:
        """Wait until a slot is free, at most `timeout_s`; whether one is free now."""
        if self.free > 0:
            return True
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._room.wait()
        return self.free > 0

    def _freed(self) -> None:
        if self.free > 0:
            self._room.set()
