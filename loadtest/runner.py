"""The parent side of a run: spawns the worker processes, merges the ticks they send, samples the hub, prints the one
live progress line, and makes sure no worker outlives the run (stop, then terminate, then kill).

Scenarios (`loadtest.scenario`) drive a `Run`: spawn workers by role, send commands, wait for their answers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import secrets
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

import aiohttp

from .accounting import Tick
from .probe import MetricsProbe, ProcProbe, ProcSample, RedisProbe
from .settings import LoadSettings
from .worker import TICK_S, worker_main

__all__ = ["Run", "WorkerError", "WorkerHandle"]

# After `stop`, how long workers may take to close their connections before they are terminated, then killed.
_STOP_GRACE_S = 10.0
_KILL_GRACE_S = 3.0


class WorkerError(Exception):
    """A worker failed, died, or did not answer in time: the run cannot give exact figures."""


class WorkerHandle:
    """The parent's view of one worker process: its pipe, its messages other than ticks, its open connections."""

    def __init__(self, name: str, process: BaseProcess, conn: Connection) -> None:
        self.name = name
        self.process = process
        self.conn = conn
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.open = 0
        self.exited = False
        self.gone = asyncio.Event()  # set with `exited`, for waiting


class Run:
    """One run of a scenario against the hub(s) in `settings`."""

    def __init__(self, settings: LoadSettings, *, session: aiohttp.ClientSession, out: TextIO = sys.stderr) -> None:
        self.settings = settings
        self.session = session  # for /metrics scrapes
        self.run_id = secrets.token_hex(4)
        self.totals = Tick()  # everything every worker reported
        self.phase_totals = Tick()  # since begin_phase()
        self.phase = "start"
        self.proc = ProcProbe(settings.pids)
        self.metrics = MetricsProbe(settings.metrics_urls)
        self.redis = RedisProbe(settings.redis_url)
        self.workers: list[WorkerHandle] = []
        self.started_s = time.monotonic()
        self._mp = multiprocessing.get_context("spawn")
        self._out = out
        self._window = Tick()
        self._window_s = time.monotonic()
        self._last_proc: ProcSample | None = None
        self.timeline: list[dict[str, Any]] = []  # one point per progress tick, for the JSON result and --plot
        self._line_len = 0
        # Set by the first worker that fails or dies: every wait of the scenario ends with WorkerError at once,
        # rather than when it next needs that worker.
        self._failure: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def channel(self, i: int) -> str:
        """The name of channel i: unique to the run, so runs against the same Redis never read each other's events."""
        return f"lt:{self.run_id}:{i}"

    def begin_phase(self, name: str) -> None:
        self.phase = name
        self.phase_totals = Tick()

    # -- workers ---------------------------------------------------------------------------------------------------

    def spawn(self, role: str, jobs: Sequence[object]) -> list[WorkerHandle]:
        """Start one worker process per job, running `role` (a name in loadtest.clients.ROLES)."""
        loop = asyncio.get_running_loop()
        handles: list[WorkerHandle] = []
        for i, job in enumerate(jobs):
            parent_end, child_end = self._mp.Pipe()
            name = f"{role}-{i}"
            # daemon: should this process die without its cleanup, multiprocessing still terminates the workers.
            proc = self._mp.Process(
                target=worker_main, args=(role, job, child_end), name=f"loadtest-{name}", daemon=True
            )
            proc.start()
            # Only the worker holds its end now, so its death reads as EOF here.
            child_end.close()
            w = WorkerHandle(name, proc, parent_end)
            loop.add_reader(parent_end.fileno(), self._on_message, w)
            # uvloop made the pipe non-blocking; a tick bigger than the pipe's buffer would then be read half and fail
            # as BlockingIOError. Blocking is right here: we read only when data is there, and the rest follows.
            os.set_blocking(parent_end.fileno(), True)
            loop.add_reader(proc.sentinel, self._on_exit, w)
            handles.append(w)
        self.workers += handles
        return handles

    def send(self, workers: Sequence[WorkerHandle], kind: str, payload: Any = None) -> None:
        for w in workers:
            if not w.exited:
                try:
                    w.conn.send((kind, payload))
                except OSError:
                    pass  # it died: its exit is already on its way to the inbox

    async def expect(self, workers: Sequence[WorkerHandle], kind: str, timeout_s: float) -> list[Any]:
        """Wait for message `kind` from each worker; their payloads, in order. Raises WorkerError on anything else."""
        out: list[Any] = []
        try:
            async with asyncio.timeout(timeout_s):
                for w in workers:
                    got, payload = await self._next(w)
                    if got == kind:
                        out.append(payload)
                    elif got == "error":
                        raise WorkerError(f"worker {w.name} failed:\n{payload}")
                    elif got == "exit":
                        raise WorkerError(f"worker {w.name} exited (code {payload}) before sending {kind!r}")
                    else:
                        raise WorkerError(f"worker {w.name} sent {got!r} where {kind!r} was expected")
        except TimeoutError:
            raise WorkerError(f"no {kind!r} from every worker within {timeout_s:.0f} s") from None
        return out

    async def hold(self, seconds: float) -> None:
        """Sleep, unless a worker fails first (then WorkerError)."""
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.shield(self._failure)
        if self._failure.done():
            raise WorkerError(self._failure.result())

    async def _next(self, w: WorkerHandle) -> tuple[str, Any]:
        if not w.inbox.empty():
            return w.inbox.get_nowait()
        get = asyncio.ensure_future(w.inbox.get())
        either: list[asyncio.Future[Any]] = [get, self._failure]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        raise WorkerError(self._failure.result())

    def _fail(self, why: str) -> None:
        if not self._failure.done():
            self._failure.set_result(why)

    def _on_message(self, w: WorkerHandle) -> None:
        try:
            while w.conn.poll():
                kind, payload = w.conn.recv()
                if kind == "tick":
                    w.open = payload.open
                    self.totals.merge(payload)
                    self.phase_totals.merge(payload)
                    self._window.merge(payload)
                else:
                    if kind == "error":
                        self._fail(f"worker {w.name} failed:\n{payload}")
                    w.inbox.put_nowait((kind, payload))
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(w.conn.fileno())

    def _on_exit(self, w: WorkerHandle) -> None:
        asyncio.get_running_loop().remove_reader(w.process.sentinel)
        if not w.conn.closed:
            self._on_message(w)  # whatever it sent before it ended comes first
        w.exited = True
        w.gone.set()
        w.open = 0
        # The sentinel closes while the process is still exiting; its exit status follows a moment later.
        w.process.join(1.0)
        code = w.process.exitcode
        if code != 0:
            self._fail(f"worker {w.name} exited with code {code}")
        w.inbox.put_nowait(("exit", code))

    async def close(self) -> None:
        """End every worker: `stop` (they close their connections), then SIGTERM, then SIGKILL; reap them all."""
        live = [w for w in self.workers if not w.exited]
        self.send(live, "stop")
        await self._wait_exits(live, _STOP_GRACE_S)
        for w in live:
            if not w.exited and w.process.is_alive():
                w.process.terminate()
        await self._wait_exits(live, _KILL_GRACE_S)
        loop = asyncio.get_running_loop()
        for w in self.workers:
            if w.process.is_alive():
                w.process.kill()
            w.process.join()
            if not w.conn.closed:
                loop.remove_reader(w.conn.fileno())
                w.conn.close()
            loop.remove_reader(w.process.sentinel)
            w.process.close()

    @staticmethod
    async def _wait_exits(workers: Sequence[WorkerHandle], timeout_s: float) -> None:
        waits = [asyncio.create_task(w.gone.wait()) for w in workers if not w.exited]
        if waits:
            await asyncio.wait(waits, timeout=timeout_s)
            for t in waits:
                t.cancel()

    # -- hub probes ------------------------------------------------------------------------------------------------

    def sample(self) -> ProcSample | None:
        """The hub's RSS and CPU now (None without --pid); also updates the peak RSS."""
        return self.proc.sample()

    async def scrape(self) -> dict[str, float] | None:
        return await self.metrics.scrape(self.session)

    # -- progress --------------------------------------------------------------------------------------------------

    async def progress(self) -> None:
        """Refresh the progress line every second, until cancelled."""
        while True:
            await asyncio.sleep(TICK_S)
            self._print_progress()

    def _print_progress(self) -> None:
        now = time.monotonic()
        window, self._window = self._window, Tick()
        elapsed = max(now - self._window_s, 1e-9)
        self._window_s = now
        parts = [f"[{self.phase}, {now - self.started_s:.0f} s]"]
        point: dict[str, Any] = {
            "t_s": round(now - self.started_s, 2),
            "phase": self.phase,
            "open": sum(w.open for w in self.workers),
            "delivered_per_s": round(window.delivered / elapsed, 1),
            "published_per_s": round(window.published / elapsed, 1),
        }
        if window.latency_us:
            p50, p99 = window.latency_us.percentiles([50, 99])
            point |= {"p50_ms": p50 / 1000, "p99_ms": p99 / 1000}
        self.timeline.append(point)
        if any(w.name.startswith("subscribe") for w in self.workers):
            parts += [f"open {sum(w.open for w in self.workers)}", f"failed {self.totals.failed}"]
        if self.totals.delivered or window.delivered:
            parts.append(f"delivered {window.delivered / elapsed:,.0f}/s")
        if window.latency_us:
            parts.append(f"p99 {window.latency_us.percentile(99) / 1000:.2f} ms")
        if self.totals.published or window.published:
            parts.append(f"published {window.published / elapsed:,.0f}/s")
        if window.request_us:
            parts.append(f"request p99 {window.request_us.percentile(99) / 1000:.2f} ms")
        proc = self.proc.sample()
        if proc is not None:
            if self._last_proc is not None:
                cpu = (proc.cpu_s - self._last_proc.cpu_s) / max(proc.at_s - self._last_proc.at_s, 1e-9)
                parts.append(f"hub cpu {cpu * 100:.0f}%")
                point["hub_cpu_percent"] = round(cpu * 100, 1)
            parts.append(f"rss {proc.rss_bytes / 2**20:.0f} MiB")
            point["hub_rss_bytes"] = proc.rss_bytes
            self._last_proc = proc
        line = " | ".join(parts)
        self._out.write("\r" + line.ljust(self._line_len))
        self._out.flush()
        self._line_len = len(line)

    def end_progress(self) -> None:
        if self._line_len:
            self._out.write("\n")
            self._out.flush()
            self._line_len = 0
