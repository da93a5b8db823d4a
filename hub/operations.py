"""The operational endpoints: liveness (/healthz), readiness (/readyz) and metrics (/metrics); and the 503 that new
work gets while the node drains, which readiness announces."""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ssecore.backend import BackendUnavailable

from .appkeys import BACKEND, FANOUT, METRICS, STATE
from .errors import ApiError

__all__ = ["refuse_when_draining", "routes"]


def refuse_when_draining(request: web.Request) -> None:
    """ApiError 503 `draining` once the node is shutting down: new streams and generations go to another node."""
    if request.app[STATE].draining:
        raise ApiError(503, "draining", "this node is shutting down; retry on another", {"Retry-After": "1"})


routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: 503 naming the loop that stopped going round (see ssecore.liveness); a Redis outage is not one."""
    status, body = request.app[METRICS].liveness.report()
    return web.Response(status=status, body=body, content_type="application/json")


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problem = None
    if state.draining:
        problem = "draining"
    else:
        try:
            await request.app[BACKEND].ping()
        except BackendUnavailable:
            problem = "backend_unavailable"
        else:
            if not request.app[FANOUT].healthy:
                problem = "live_tail_failing"
    if problem is not None:
        body = orjson.dumps({"status": "unavailable", "reason": problem})
        return web.Response(status=503, body=body, content_type="application/json")
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
