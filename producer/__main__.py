"""`python -m producer`: flags and PRODUCER_* environment (plus the providers' own variables) → a Worker.

The only module of the package that reads os.environ.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import orjson
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hub.backend import BackendUnavailable
from hub.backend_redis import RedisBackend
from hub.presence import RedisPresence

from .queue_redis import RedisJobQueue
from .settings import ProducerSettings, ProviderKeys, providers_for
from .worker import Worker

log = logging.getLogger("producer")


async def _serve_metrics(
    registry: CollectorRegistry, port: int, problem: Callable[[], Awaitable[str | None]] | None = None
) -> web.AppRunner:
    """The worker's operations endpoints: /metrics, /healthz (the process answers) and /readyz (it can work: `problem`
    says why not, as the hub's /readyz does; a rollout waits for a new worker that cannot reach Redis)."""

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def readyz(_request: web.Request) -> web.Response:
        reason = await problem() if problem is not None else None
        if reason is not None:
            body = orjson.dumps({"status": "unavailable", "reason": reason})
            return web.Response(status=503, body=body, content_type="application/json")
        return web.Response(body=b'{"status":"ready"}', content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def _main(settings: ProducerSettings, keys: ProviderKeys) -> None:
    assert settings.redis_url is not None
    registry = CollectorRegistry()
    cluster = settings.redis_cluster
    backend = RedisBackend(
        settings.redis_url, prefix=settings.key_prefix, history=settings.history, ttl_s=settings.ttl_s, cluster=cluster
    )
    queue = RedisJobQueue(
        settings.redis_url,
        prefix=settings.key_prefix,
        group=settings.group,
        record_ttl_s=settings.ttl_s,
        cluster=cluster,
    )
    presence = RedisPresence(settings.redis_url, prefix=settings.key_prefix, cluster=cluster)
    worker = Worker(
        settings,
        backend=backend,
        queue=queue,
        providers=providers_for(settings, keys),
        presence=presence,
        registry=registry,
    )

    async def problem() -> str | None:
        if worker.stopping:
            return "stopping"
        try:
            await backend.ping()
        except BackendUnavailable:
            return "backend_unavailable"
        return None

    runner = await _serve_metrics(registry, settings.metrics_port, problem) if settings.metrics_port else None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run_async()
    finally:
        if runner is not None:
            await runner.cleanup()
        await presence.aclose()
        await queue.aclose()
        await backend.aclose()
    log.info("worker stopped")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = ProducerSettings.from_args(argv, os.environ)
        if settings.redis_url is None:
            raise ValueError(
                "invalid setting redis-url (PRODUCER_REDIS_URL): a worker process needs Redis "
                "(without Redis, the hub runs its own embedded worker)"
            )
    except ValueError as e:
        print(f"python -m producer: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(_main(settings, ProviderKeys.from_env(os.environ)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
