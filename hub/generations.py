"""HTTP handlers of the job API: start, inspect and cancel AI generations. Workers do the generating."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web

from ssecore.backend import BackendError
from ssecore.jobs import (
    TERMINAL_STATUSES,
    GenerationRecord,
    Job,
    JobRequestError,
    TooManyGenerations,
    new_generation_id,
    parse_job_request,
)

from .appkeys import AUTH, BACKEND, JOBS, LIMITS, PROVIDERS, SETTINGS
from .auth import Action, Principal
from .channels import channel_ok
from .errors import ApiError
from .formats import json_response
from .jsonbody import parse_json, read_body
from .operations import refuse_when_draining
from .ownership import may_reach
from .stream import stream_channel

__all__ = ["cancelled_if_refused", "reachable_record", "routes", "start_generation", "start_translated"]

routes = web.RouteTableDef()


def _wants_stream(request: web.Request) -> bool:
    for part in request.headers.get("Accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media == "text/event-stream" and "q=0" not in params and "q=0.0" not in params:
            return True
    return False


async def start_generation(
    request: web.Request, translate: Callable[[Any], Any] | None = None, *, json_as_text: bool = False
) -> tuple[Job, Principal]:
    """Validate the request's JSON body (translated first, for another API's shape) into a job and submit it: the
    generation's channel taken for its owner, its slot counted. Raises ApiError (nothing queued) when it cannot."""
    refuse_when_draining(request)
    auth = request.app[AUTH]
    auth.authenticate(request)  # 401 before anything is read
    # `json_as_text`: a client that sends its JSON as text/plain (WorkflowChatTransport's fetch does) is read alike.
    if request.content_type != "application/json" and not (json_as_text and request.content_type == "text/plain"):
        raise ApiError(415, "unsupported_media_type", "send the job as application/json")
    limits = request.app[LIMITS]
    if request.content_length is not None:
        limits.job_bytes(request.content_length)  # before reading what would be refused anyway
    raw = await read_body(request, request.app[SETTINGS])
    limits.job_bytes(len(raw))
    body = parse_json(raw)
    settings = request.app[SETTINGS]
    providers = request.app[PROVIDERS]
    try:
        job = parse_job_request(
            translate(body) if translate is not None else body,
            providers=providers.kinds,
            models=providers.models,
            generation_id=new_generation_id(),
            channel_ok=lambda name: channel_ok(name, settings.max_channel_len),
            default_unwatched_s=settings.cancel_if_unwatched_s or None,
        )
    except JobRequestError as e:
        raise ApiError(400, e.code, e.message) from None
    principal = auth.require(request, "publish", job.channel)
    client = limits.client(request, principal)
    # A job's bytes count like a publish's: its messages are written to the store (the job queue) too.
    limits.publish(client, 1, len(raw))
    job = dataclasses.replace(job, owner=client)
    backend = request.app[BACKEND]
    # The channel becomes the generation's before the job exists: from the first moment a worker could take the job,
    # no one but that worker can write the channel, and only its owner (or a token naming it) can read it.
    if not await backend.reserve(job.channel, client):
        # One generation per channel: its end marker closes it, and two writers would interleave.
        raise ApiError(409, "channel_exists", "the channel already exists; use a new one (or delete it first)")
    try:
        await request.app[JOBS].submit(job, max_active=settings.max_generations_per_client)
    except (TooManyGenerations, BackendError) as e:
        # Nothing was queued (as far as this node can tell): the name is free again, else its mark would lapse with
        # the channel's TTL. Only our own mark on a channel nothing wrote: a job that was queued after all and has
        # begun to write keeps its owner.
        with contextlib.suppress(BackendError):
            await backend.release(job.channel, client)
        if isinstance(e, TooManyGenerations):
            raise limits.too_many_generations() from None
        raise
    return job, principal


# A translation of another API's request into a generation's: (body, provider kinds, --default-provider) -> body.
Translation = Callable[[Any, Mapping[str, str], str], Any]


async def start_translated(
    request: web.Request, translation: Translation, *, json_as_text: bool = False
) -> tuple[Job, Principal, dict[str, Any]]:
    """`start_generation` for another API's request: the job, its principal, and the request's own body."""
    seen: dict[str, Any] = {}
    settings = request.app[SETTINGS]

    def translate(body: Any) -> Any:
        seen.update(body if isinstance(body, dict) else {})
        return translation(body, request.app[PROVIDERS].kinds, settings.default_provider)

    job, principal = await start_generation(request, translate, json_as_text=json_as_text)
    return job, principal, seen


@contextlib.asynccontextmanager
async def cancelled_if_refused(request: web.Request, job: Job) -> AsyncIterator[None]:
    """A generation refused after it was queued (a limit, the store, a failed generation) is cancelled: the SDKs
    retry such answers, and each retry would leave one running for nobody. A client that goes away cancels nothing:
    the generation goes on, and is read by its id."""
    try:
        yield
    except (ApiError, BackendError):
        with contextlib.suppress(BackendError):
            await request.app[JOBS].request_cancel(job.id)
        raise


@routes.post("/v1/generations")
async def create_generation(request: web.Request) -> web.StreamResponse:
    job, principal = await start_generation(request)
    if _wants_stream(request):
        # Like the providers' own APIs: the events in this response; still resumable through events_url.
        return await stream_channel(request, job.channel, "0", principal)
    events_url = f"/v1/channels/{job.channel}/events"
    return json_response({"id": job.id, "channel": job.channel, "events_url": events_url}, status=202)


async def reachable_record(request: web.Request, generation_id: str, *actions: Action) -> GenerationRecord:
    """The generation named in the path, if the caller may reach it by one of `actions`; else the 404 of an unknown
    one, the same status and body: another client's generation is not told apart from none."""
    principal = request.app[AUTH].authenticate(request)
    client = request.app[LIMITS].client(request, principal)
    record = await request.app[JOBS].get(generation_id)
    if record is None or not any(may_reach(principal, client, a, record.channel, record.owner) for a in actions):
        raise ApiError(404, "generation_not_found", "no such generation (or it expired)")
    return record


@routes.get("/v1/generations/{id}")
async def get_generation(request: web.Request) -> web.Response:
    record = await reachable_record(request, request.match_info["id"], "subscribe", "publish")
    return json_response(record.public())


@routes.delete("/v1/generations/{id}")
async def cancel_generation(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    record = await reachable_record(request, request.match_info["id"], "publish")
    if record.status in TERMINAL_STATUSES:
        raise ApiError(409, "generation_finished", f"the generation is already {record.status}")
    await jobs.request_cancel(record.id)
    return json_response({"id": record.id, "status": record.status, "cancel_requested": True}, status=202)
