"""The worker's operations endpoints on its metrics port: /metrics, /healthz and /readyz.

/healthz is liveness: 200 while every loop of the worker goes round, 503 naming the loops that stopped (a restart is
the cure). A loop that fails every round because Redis is down still goes round, so an outage of Redis does not make
Kubernetes restart every worker; /readyz says that instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ssecore.liveness import Liveness

__all__ = ["endpoints_app"]


def endpoints_app(
    registry: CollectorRegistry, liveness: Liveness, problem: Callable[[], Awaitable[str | None]] | None = None
) -> web.Application:
    """`problem` says why the worker cannot work (as the hub's /readyz does), or None: a rollout waits for a new
    worker that cannot reach Redis."""

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        status, body = liveness.report()
        return web.Response(status=status, body=body, content_type="application/json")

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
    return app
