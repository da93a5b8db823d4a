"""HTTP handlers of the job API: start, inspect and cancel AI generations. Workers do the generating."""

from __future__ import annotations

import orjson
from aiohttp import web

from producer.jobs import TERMINAL_STATUSES, JobRequestError, new_generation_id, parse_job_request

from .errors import ApiError
from .handlers import _draining, channel_ok, read_body, stream_channel
from .jsonbody import parse_json
from .keys import AUTH, BACKEND, JOBS, LIMITS, PROVIDERS, SETTINGS

__all__ = ["routes"]

routes = web.RouteTableDef()


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _wants_stream(request: web.Request) -> bool:
    for part in request.headers.get("Accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media == "text/event-stream" and "q=0" not in params and "q=0.0" not in params:
            return True
    return False


@routes.post("/v1/generations")
async def create_generation(request: web.Request) -> web.StreamResponse:
    _draining(request)
    auth = request.app[AUTH]
    auth.authenticate(request)  # 401 before anything is read
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the job as application/json")
    body = parse_json(await read_body(request, request.app[SETTINGS]))
    settings = request.app[SETTINGS]
    providers: frozenset[str] = request.app[PROVIDERS]
    try:
        job = parse_job_request(
            body,
            providers=providers,
            generation_id=new_generation_id(),
            channel_ok=lambda name: channel_ok(name, settings.max_channel_len),
            default_unwatched_s=settings.cancel_if_unwatched_s or None,
        )
    except JobRequestError as e:
        raise ApiError(400, e.code, e.message) from None
    principal = auth.require(request, "publish", job.channel)
    limits = request.app[LIMITS]
    limits.publish(limits.client(request, principal), 1)
    if "channel" in body and await request.app[BACKEND].info(job.channel) is not None:
        # One generation per channel: its end marker closes it, and two writers would interleave.
        raise ApiError(409, "channel_exists", "the channel already exists; use a new one (or delete it first)")
    await request.app[JOBS].submit(job)
    if _wants_stream(request):
        # Like the providers' own APIs: the events in this response; still resumable through events_url.
        return await stream_channel(request, job.channel, "0", principal)
    events_url = f"/v1/channels/{job.channel}/events"
    return _json({"id": job.id, "channel": job.channel, "events_url": events_url}, status=202)


@routes.get("/v1/generations/{id}")
async def get_generation(request: web.Request) -> web.Response:
    principal = request.app[AUTH].authenticate(request)
    record = await request.app[JOBS].get(request.match_info["id"])
    if record is None:
        raise ApiError(404, "generation_not_found", "no such generation (or it expired)")
    if not (principal.may("subscribe", record.channel) or principal.may("publish", record.channel)):
        raise ApiError(403, "forbidden", "this token may not see this generation")
    return _json(record.public())


@routes.delete("/v1/generations/{id}")
async def cancel_generation(request: web.Request) -> web.Response:
    principal = request.app[AUTH].authenticate(request)
    jobs = request.app[JOBS]
    record = await jobs.get(request.match_info["id"])
    if record is None:
        raise ApiError(404, "generation_not_found", "no such generation (or it expired)")
    if not principal.may("publish", record.channel):
        raise ApiError(403, "forbidden", "this token may not cancel this generation")
    if record.status in TERMINAL_STATUSES:
        raise ApiError(409, "generation_finished", f"the generation is already {record.status}")
    await jobs.request_cancel(record.id)
    return _json({"id": record.id, "status": record.status, "cancel_requested": True}, status=202)
