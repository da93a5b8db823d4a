"""create_app(): the hub as an aiohttp Application, its resources managed through cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from ssecore.backend import Backend
from ssecore.backend_memory import MemoryBackend
from ssecore.backend_redis import RedisBackend
from ssecore.jobs import JobQueue
from ssecore.presence import MemoryPresence, Presence, RedisPresence
from ssecore.provider_file import catalog, load_provider_file
from ssecore.queue_memory import MemoryJobQueue
from ssecore.queue_redis import DEFAULT_GROUP, RedisJobQueue

from .ai_sdk import routes as ai_sdk_routes
from .appkeys import AUTH, BACKEND, FANOUT, JOBS, LIMITS, METRICS, PRESENCE, PROVIDERS, SETTINGS, STATE, NodeState
from .auth import Authenticator
from .channels import routes as channel_routes
from .chat_completions import routes as chat_completions_routes
from .cors import Cors
from .errors import error_middleware
from .fanout import Fanout
from .generations import routes as generation_routes
from .headers import security_headers
from .limits import Limits
from .metrics import HubMetrics
from .openapi import routes as openapi_routes
from .operations import routes as operations_routes
from .page import routes as page_routes
from .publish import routes as publish_routes
from .responses_api import routes as responses_routes
from .settings import HubSettings
from .stream import routes as stream_routes

__all__ = ["begin_drain", "create_app", "make_backend"]

log = logging.getLogger(__name__)

# Share of the grace period over which stream ends are spread on shutdown; the rest is for their last writes.
_DRAIN_SPREAD = 0.5
_DRAIN_WAIT = 0.8


def make_backend(settings: HubSettings) -> Backend:
    target = settings.redis_target
    if target is None:
        log.warning("no --redis-url: using the embedded memory backend (single node; data is lost on restart)")
        return MemoryBackend(
            history=settings.history, ttl_s=settings.ttl_s, idempotency_window_s=settings.idempotency_window_s
        )
    kind = "Redis Cluster" if settings.redis_cluster else "Redis"
    log.info("using %s backend at %s", kind, target.describe())
    return RedisBackend(
        target,
        prefix=settings.key_prefix,
        history=settings.history,
        ttl_s=settings.ttl_s,
        timeout_s=settings.redis_timeout_s,
        idempotency_window_s=settings.idempotency_window_s,
        cluster=settings.redis_cluster,
        replicas=settings.publish_replicas,
        replicas_timeout_s=settings.publish_replicas_timeout_s,
    )


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
    jobs: JobQueue | None = None,
    presence: Presence | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """Build a hub node's web application. Injected `backend`, `jobs` and `presence` are shared, not owned: the app
    does not close them.

    The job queue is Redis when `redis_target` is set, else in memory. A generation worker in the same process is not
    the web layer's business: hub.__main__.create_node adds one where `embedded_worker` says so.
    """
    cors = Cors(settings.cors_origins)
    # The largest body of any route; each route checks its own limit (--max-body, --max-job-bytes).
    max_size = max(settings.max_body_bytes, settings.max_job_bytes)
    app = web.Application(middlewares=[cors.middleware, error_middleware], client_max_size=max_size)
    app[SETTINGS] = settings
    app[STATE] = NodeState()
    app[AUTH] = Authenticator(settings)  # reads key files now: a bad one stops the start, not the first request
    app.on_response_prepare.append(cors.on_response_prepare)
    app.on_response_prepare.append(security_headers)
    # Without --demo a demo job is refused like any provider the hub does not know.
    entries = load_provider_file(settings.providers_file) if settings.providers_file else {}
    app[PROVIDERS] = catalog(entries, demo=settings.demo)
    metrics_registry = registry if registry is not None else CollectorRegistry()
    app[METRICS] = HubMetrics(metrics_registry)
    app[LIMITS] = Limits(settings, app[METRICS])

    async def backend_ctx(app: web.Application) -> AsyncIterator[None]:
        owned = backend is None
        app[BACKEND] = make_backend(settings) if backend is None else backend
        yield
        if owned:
            await app[BACKEND].aclose()

    async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
        owned: list[JobQueue | Presence] = []
        if jobs is not None:
            app[JOBS] = jobs
        elif settings.redis_target is not None:
            app[JOBS] = RedisJobQueue(
                settings.redis_target,
                prefix=settings.key_prefix,
                group=DEFAULT_GROUP,
                record_ttl_s=settings.ttl_s,
                timeout_s=settings.redis_timeout_s,
                cluster=settings.redis_cluster,
                replicas=settings.publish_replicas,
                replicas_timeout_s=settings.publish_replicas_timeout_s,
                # An embedded worker on Redis takes the file's providers' jobs too.
                providers=app[PROVIDERS].kinds,
            )
            owned.append(app[JOBS])
        else:
            app[JOBS] = MemoryJobQueue()
        if presence is not None:
            app[PRESENCE] = presence
        elif settings.redis_target is not None:
            app[PRESENCE] = RedisPresence(
                settings.redis_target,
                prefix=settings.key_prefix,
                timeout_s=settings.redis_timeout_s,
                cluster=settings.redis_cluster,
            )
            owned.append(app[PRESENCE])
        else:
            app[PRESENCE] = MemoryPresence()
        yield
        for resource in owned:
            await resource.aclose()

    async def fanout_ctx(app: web.Application) -> AsyncIterator[None]:
        fanout = Fanout(
            app[BACKEND],
            app[METRICS],
            block_s=settings.tail_block_s,
            heartbeat_s=settings.heartbeat_s,
            presence=app[PRESENCE],
            window_bytes=settings.resume_window_bytes,
            linger_s=settings.linger_s,
            stuck_after_s=settings.tail_stuck_bound_s,
        )
        app[FANOUT] = fanout
        await fanout.start()
        yield
        await fanout.stop()

    app.cleanup_ctx.extend([backend_ctx, jobs_ctx, fanout_ctx])
    # Normally the drain has already run (see begin_drain) and this finds nothing left to end.
    app.on_shutdown.append(begin_drain)
    # Publish, then stream at once: routes added in a row for one path share a resource, as the POST and GET of
    # .../events always have.
    app.add_routes(publish_routes)
    app.add_routes(stream_routes)
    app.add_routes(channel_routes)
    app.add_routes(operations_routes)
    app.add_routes(generation_routes)
    app.add_routes(chat_completions_routes)
    app.add_routes(responses_routes)
    app.add_routes(ai_sdk_routes)
    app.add_routes(openapi_routes)
    app.add_routes(page_routes)
    return app
