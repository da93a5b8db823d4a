"""create_app(): the hub as an aiohttp Application, its resources managed through cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from .backend import Backend
from .backend_memory import MemoryBackend
from .backend_redis import RedisBackend
from .errors import error_middleware
from .fanout import Fanout
from .handlers import routes
from .keys import BACKEND, FANOUT, METRICS, SETTINGS, STATE, NodeState
from .metrics import HubMetrics
from .settings import HubSettings

__all__ = ["begin_drain", "create_app", "make_backend"]

log = logging.getLogger(__name__)

# Share of the grace period over which stream ends are spread on shutdown; the rest is for their last writes.
_DRAIN_SPREAD = 0.5
_DRAIN_WAIT = 0.8


def make_backend(settings: HubSettings) -> Backend:
    if settings.redis_url is None:
        log.warning("no --redis-url: using the embedded memory backend (single node; data is lost on restart)")
        return MemoryBackend(history=settings.history, ttl_s=settings.ttl_s)
    log.info("using Redis backend at %s", _redact(settings.redis_url))
    return RedisBackend(
        settings.redis_url,
        prefix=settings.key_prefix,
        history=settings.history,
        ttl_s=settings.ttl_s,
        timeout_s=settings.redis_timeout_s,
    )


def _redact(url: str) -> str:
    # Never log a password that is part of the URL.
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


async def begin_drain(app: web.Application) -> None:
    """Mark the node draining (readiness 503, new streams 503) and end open streams, spread over part of the grace
    period, once their pending events are written. Returns when they are gone or the wait is over."""
    settings = app[SETTINGS]
    app[STATE].draining = True
    if FANOUT in app:
        await app[FANOUT].drain(settings.grace_s * _DRAIN_SPREAD, settings.grace_s * _DRAIN_WAIT)


def create_app(
    settings: HubSettings,
    *,
    backend: Backend | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """Build a hub node. An injected `backend` is shared, not owned: the app does not close it."""
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[STATE] = NodeState()
    app[METRICS] = HubMetrics(registry if registry is not None else CollectorRegistry())

    async def backend_ctx(app: web.Application) -> AsyncIterator[None]:
        owned = backend is None
        app[BACKEND] = make_backend(settings) if backend is None else backend
        yield
        if owned:
            await app[BACKEND].aclose()

    async def fanout_ctx(app: web.Application) -> AsyncIterator[None]:
        fanout = Fanout(app[BACKEND], app[METRICS], block_s=settings.tail_block_s, heartbeat_s=settings.heartbeat_s)
        app[FANOUT] = fanout
        await fanout.start()
        yield
        await fanout.stop()

    app.cleanup_ctx.extend([backend_ctx, fanout_ctx])
    # Normally the drain has already run (see begin_drain) and this finds nothing left to end.
    app.on_shutdown.append(begin_drain)
    app.add_routes(routes)
    return app
