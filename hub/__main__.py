"""`python -m hub`: flags and HUB_* environment → HubSettings → logging → uvloop → run_app.

The composition root: the one module that puts the web layer (hub) and the generation worker (producer) together
(`create_node`), and the only one that reads os.environ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web
from aiohttp.web_runner import GracefulExit
from prometheus_client import CollectorRegistry

from producer.settings import ProducerSettings, ProviderKeys, providers_for
from producer.worker import Worker
from ssecore.backend import Backend
from ssecore.jobs import JobQueue
from ssecore.presence import Presence
from ssecore.queue_memory import MemoryJobQueue
from ssecore.startup import listen_failure, setting

from .app import begin_drain, create_app
from .appkeys import BACKEND, JOBS, METRICS, PRESENCE
from .httplog import RedactedAccessLogger, server_logger
from .settings import HubSettings

log = logging.getLogger("hub")

# Fraction of the grace period aiohttp may wait for handlers after our own drain (it applies this twice).
_SHUTDOWN_TIMEOUT_SHARE = 0.08
_LINGERING_S = 2.0


async def _drain_on_signal(app: web.Application) -> None:
    """Replace aiohttp's SIGTERM/SIGINT handlers (installed just before start-up) with: drain while still listening,
    so load balancers see readiness 503 and new subscriptions get 503 + Retry-After, then exit. A second signal exits
    at once."""
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task[None]] = []

    def exit_now() -> None:
        raise GracefulExit()

    async def drain_then_exit() -> None:
        try:
            await begin_drain(app)
        finally:
            loop.call_soon(exit_now)

    def on_signal(sig: signal.Signals) -> None:
        if draining:
            log.warning("%s again: exiting now", sig.name)
            exit_now()
        log.info("%s: draining", sig.name)
        draining.append(loop.create_task(drain_then_exit()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def _raise_fd_limit() -> None:
    # Every SSE connection holds a file descriptor; the usual soft limit (1024) is far below what a node serves.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("file descriptor limit: %s", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


_SOMAXCONN = "/proc/sys/net/core/somaxconn"


def backlog_warning(backlog: int, somaxconn: int | None) -> str | None:
    """What to say when the kernel will queue fewer unaccepted connections than --backlog asks (it caps the queue at
    net.core.somaxconn without a word): beyond that, a reconnect storm's connections are dropped at the handshake and
    wait for the client's SYN retries, 1 s, then 3 s, then 7 s."""
    if somaxconn is None or somaxconn >= backlog:
        return None
    return (
        f"the kernel queues at most {somaxconn} connections before they are accepted (net.core.somaxconn), below "
        f"--backlog {backlog}: in a reconnect storm of more, the rest wait for SYN retries (1 s, 3 s, ...); raise "
        "net.core.somaxconn (docs/deployment.md)"
    )


def _somaxconn() -> int | None:
    try:
        with open(_SOMAXCONN) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def create_node(
    settings: HubSettings,
    *,
    worker_settings: ProducerSettings | None = None,
    provider_keys: ProviderKeys | None = None,
    backend: Backend | None = None,
    jobs: JobQueue | None = None,
    presence: Presence | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """A hub node: its web application (hub.app.create_app) and, where `embedded_worker` says so ("auto": with the
    in-memory job queue, where no other process could take the jobs), a generation worker in the same process, with
    `worker_settings` and `provider_keys`.

    The one place where the hub and the worker meet: the web layer never imports the worker.
    """
    app = create_app(settings, backend=backend, jobs=jobs, presence=presence, registry=registry)

    async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
        embedded = settings.embedded_worker == "on" or (
            settings.embedded_worker == "auto" and isinstance(app[JOBS], MemoryJobQueue)
        )
        if not embedded:
            yield
            return
        # The hub's --demo decides for its own worker: it must run every job the hub accepts, and none it refuses.
        # So does its --providers-file: the worker has every provider the hub accepts jobs for.
        ws = dataclasses.replace(
            worker_settings or ProducerSettings(metrics_port=0),
            demo=settings.demo,
            providers_file=settings.providers_file,
        )
        worker = Worker(
            ws,
            backend=app[BACKEND],
            queue=app[JOBS],
            providers=providers_for(ws, provider_keys or ProviderKeys()),
            presence=app[PRESENCE],
            registry=app[METRICS].registry,
            liveness=app[METRICS].liveness,  # the hub's /healthz fails too when one of its loops is stuck
            store_timeout_s=0.0 if isinstance(app[JOBS], MemoryJobQueue) else settings.redis_timeout_s,
        )
        if ws.demo:
            log.info("running an embedded generation worker (demo provider at %g tokens/s)", ws.demo_tokens_per_s)
        else:
            log.info("running an embedded generation worker (no demo provider)")
        task = asyncio.create_task(worker.run_async(), name="embedded-worker")
        yield
        worker.stop()
        await task

    # After the app's own contexts: the worker starts once the store, the queue and presence are there, and stops
    # before they close.
    app.cleanup_ctx.append(worker_ctx)
    return app


def main(argv: list[str] | None = None) -> int:
    try:
        settings = HubSettings.from_args(argv, os.environ)
        # The embedded worker (memory backend) takes the same PRODUCER_* variables as `python -m producer`.
        worker_settings = ProducerSettings.from_args([], {**os.environ, "PRODUCER_METRICS_PORT": "0"})
    except ValueError as e:
        print(f"python -m hub: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _raise_fd_limit()
    if (warning := backlog_warning(settings.backlog, _somaxconn())) is not None:
        log.warning("%s", warning)
    try:
        app = create_node(settings, worker_settings=worker_settings, provider_keys=ProviderKeys.from_env(os.environ))
    except (ValueError, OSError) as e:
        # A key file that cannot be read or parsed: say so and stop, before listening.
        print(f"python -m hub: {e}", file=sys.stderr)
        return 2
    if settings.anonymous:
        log.warning("ANONYMOUS MODE: no authentication; anyone who can reach this hub may read and write every channel")

    async def freeze_heap(app: web.Application) -> None:
        # Long-lived start-up objects never become garbage; keeping them out of full collections shortens pauses.
        gc.collect()
        gc.freeze()

    app.on_startup.append(freeze_heap)
    app.on_startup.append(_drain_on_signal)
    try:
        _run(app, settings)
    except OSError as e:
        line = listen_failure(
            e,
            host=settings.host,
            port=settings.port,
            host_setting=setting("HUB_", "host"),
            port_setting=setting("HUB_", "port"),
        )
        if line is None:
            raise
        print(f"python -m hub: {line}", file=sys.stderr)
        return 2
    return 0


def _run(app: web.Application, settings: HubSettings) -> None:
    def listening(_message: str) -> None:
        # aiohttp's "Running on ..." comes once the socket is bound: said then, not before a bind that may fail.
        log.info("hub listening on http://%s:%d", settings.host, settings.port)

    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        loop=uvloop.new_event_loop(),
        handler_cancellation=True,
        # Also the deadline for a connection's first request: aiohttp starts this timer when the connection opens, so
        # connections that never send a complete request (idle, or slowloris) are closed after it.
        keepalive_timeout=settings.idle_timeout_s,
        # After refusing a body (413, 408) read what is still coming for at most this long, then close: long enough
        # for an honest client to see the answer, short enough that a stalled one cannot hold the connection.
        lingering_time=_LINGERING_S,
        shutdown_timeout=settings.grace_s * _SHUTDOWN_TIMEOUT_SHARE,
        # aiohttp's default queue of 128 unaccepted connections overflows when thousands of clients reconnect at
        # once (a network blip, another node's drain); the kernel then drops their SYNs and each waits a whole
        # second to retry. The kernel caps this at net.core.somaxconn.
        backlog=settings.backlog,
        access_log=logging.getLogger("aiohttp.access") if settings.log_level == "debug" else None,
        access_log_class=RedactedAccessLogger,
        # Passed on to each connection's handler: its messages, with malformed requests as one debug line.
        logger=server_logger(),
        print=listening,
    )


if __name__ == "__main__":
    sys.exit(main())
