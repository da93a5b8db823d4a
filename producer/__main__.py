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

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from ssecore.backend import BackendUnavailable
from ssecore.backend_redis import RedisBackend
from ssecore.liveness import Liveness
from ssecore.presence import RedisPresence
from ssecore.queue_redis import RedisJobQueue
from ssecore.startup import StartupError, listen_failure, setting

from .endpoints import endpoints_app
from .settings import REDIS_TIMEOUT_S, ProducerSettings, ProviderKeys, providers_for
from .worker import Worker

log = logging.getLogger("producer")
_ENV = "PRODUCER_"


async def _serve_endpoints(
    settings: ProducerSettings,
    registry: CollectorRegistry,
    liveness: Liveness,
    problem: Callable[[], Awaitable[str | None]] | None = None,
) -> web.AppRunner:
    runner = web.AppRunner(endpoints_app(registry, liveness, problem), access_log=None)
    await runner.setup()
    host, port = settings.metrics_host, settings.metrics_port
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        line = listen_failure(
            e,
            host=host,
            port=port,
            host_setting=setting(_ENV, "metrics-host"),
            port_setting=setting(_ENV, "metrics-port"),
            port_hint=" (each worker on a host needs its own), or 0 for no metrics server",
        )
        if line is None:
            raise
        raise StartupError(line) from e
    return runner


async def _main(settings: ProducerSettings, keys: ProviderKeys) -> None:
    url = settings.redis_target
    assert url is not None
    registry = CollectorRegistry()
    cluster, prefix = settings.redis_cluster, settings.key_prefix
    t = REDIS_TIMEOUT_S
    backend = RedisBackend(
        url,
        prefix=prefix,
        history=settings.history,
        ttl_s=settings.ttl_s,
        timeout_s=t,
        cluster=cluster,
        replicas=settings.publish_replicas,
        replicas_timeout_s=settings.publish_replicas_timeout_s,
    )
    providers = providers_for(settings, keys)
    # It takes the jobs of the providers it has, and only those: workers with other files may share the Redis.
    queue = RedisJobQueue(
        url,
        prefix=prefix,
        group=settings.group,
        record_ttl_s=settings.ttl_s,
        timeout_s=t,
        cluster=cluster,
        providers=providers,
    )
    presence = RedisPresence(url, prefix=prefix, timeout_s=t, cluster=cluster)
    worker = Worker(
        settings,
        backend=backend,
        queue=queue,
        providers=providers,
        presence=presence,
        registry=registry,
        store_timeout_s=t,
    )

    async def problem() -> str | None:
        if worker.stopping:
            return "stopping"
        try:
            await backend.ping()
        except BackendUnavailable:
            return "backend_unavailable"
        return None

    runner: web.AppRunner | None = None
    try:
        if settings.metrics_port:
            runner = await _serve_endpoints(settings, registry, worker.liveness, problem)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
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
        if settings.redis_target is None:
            raise ValueError(
                f"invalid setting {setting('PRODUCER_', 'redis-url')}: a worker process needs Redis, by URL or by "
                f"{setting('PRODUCER_', 'redis-sentinels')} (without Redis, the hub runs its own embedded worker)"
            )
    except ValueError as e:
        print(f"python -m producer: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(_main(settings, ProviderKeys.from_env(os.environ)))
    except StartupError as e:
        print(f"python -m producer: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
