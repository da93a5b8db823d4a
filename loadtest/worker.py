"""Worker processes: each runs one client role (`loadtest.clients.ROLES`) on uvloop, takes commands from the parent
over a pipe, and sends back a `Tick` of its counters every second plus the role's own messages (ready, done).

A `stop` command, or the parent's end of the pipe closing, cancels the role at once; the role's own cleanup closes its
connections. Workers ignore SIGINT: Ctrl-C reaches the whole process group, and the parent decides how to stop.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from .accounting import Tick

__all__ = ["TICK_S", "WorkerContext", "worker_main"]

TICK_S = 1.0


class WorkerContext:
    """A role's link to the parent: the current tick to count into, the open-connection gauge, commands, messages."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.tick = Tick()  # replaced every second; always count into `ctx.tick`, never into a saved reference
        self.open = 0
        self.commands: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        # A pipe write waits whenever the parent is slow to read (they share loaded cores). One thread does the
        # writes, in order, so the event loop keeps reading the streams meanwhile.
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="report")
        self._failed: BaseException | None = None

    def send(self, kind: str, payload: Any = None) -> None:
        if self._failed is not None:
            raise OSError("the parent's pipe is closed") from self._failed
        self._sender.submit(self.conn.send, (kind, payload)).add_done_callback(self._sent)

    def _sent(self, future: Future[None]) -> None:
        if (exc := future.exception()) is not None and self._failed is None:
            self._failed = exc

    def close(self) -> None:
        """Wait until everything queued has reached the pipe."""
        self._sender.shutdown(wait=True)

    def flush(self) -> None:
        """Send what was counted since the last tick."""
        tick, self.tick = self.tick, Tick()
        tick.open = self.open
        self.send("tick", tick)

    def ready(self, payload: Any = None) -> None:
        """Say `ready`: set up (streams open, clients built), about to be measured. What was set up lives until the
        end, so it is frozen out of garbage collection first: a full collection that walks it pauses a worker for
        tens of milliseconds (seen: 32 ms in the generations writer, 59 ms in a subscriber of 500 streams), which
        would read as the server's latency."""
        gc.collect()
        gc.freeze()
        self.send("ready", payload)

    def finish(self, kind: str, payload: Any = None) -> None:
        """Send the last counts, then `kind`: the pipe keeps order, so the parent has every count when it sees it."""
        self.flush()
        self.send(kind, payload)

    async def command(self) -> tuple[str, Any]:
        return await self.commands.get()


def worker_main(role: str, job: object, conn: Connection) -> None:
    """Process entry point (spawned): run `role` with `job` until it returns or is stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        uvloop.run(_serve(role, job, conn))
    finally:
        conn.close()


async def _serve(role: str, job: object, conn: Connection) -> None:
    from .clients import ROLES  # imported here: the clients register their roles, and import this module

    loop = asyncio.get_running_loop()
    ctx = WorkerContext(conn)
    task = asyncio.create_task(ROLES[role](ctx, job))

    def on_command() -> None:
        try:
            while conn.poll():
                kind, payload = conn.recv()
                if kind == "stop":
                    task.cancel()
                else:
                    ctx.commands.put_nowait((kind, payload))
        except (EOFError, OSError):
            # The parent is gone: nobody will read our figures, so stop and close everything now.
            loop.remove_reader(conn.fileno())
            task.cancel()

    async def ticker() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                ctx.flush()
            except OSError:
                task.cancel()
                return

    loop.add_reader(conn.fileno(), on_command)
    # uvloop made the pipe non-blocking: a write to a full pipe would raise BlockingIOError, which read as "the
    # parent is gone" and ended the run under load. The sender thread may block; reads happen only when readable.
    os.set_blocking(conn.fileno(), True)
    ticks = asyncio.create_task(ticker())
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        # The role was cancelled by a stop command: a normal way to end.
    except Exception:
        try:
            ctx.send("error", traceback.format_exc())
        except OSError:
            pass
    finally:
        ticks.cancel()
        await asyncio.to_thread(ctx.close)
        if not conn.closed:
            loop.remove_reader(conn.fileno())
