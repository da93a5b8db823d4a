"""API errors and the middleware that turns every failure into a JSON body `{"error", "message"}` with its status."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web

from ssecore.backend import (
    BackendUnavailable,
    ChannelClosed,
    ChannelOwned,
    IdempotencyConflict,
    InvalidPosition,
    NotReplicated,
)

__all__ = ["OPENAI_ERRORS", "ApiError", "error_middleware", "json_error"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A client-facing error: HTTP status, a stable machine-readable code, and a message for people."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more fields of the JSON body, e.g. which limit was hit


def json_error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": code, "message": message, **(extra or {})}),
        content_type="application/json",
        headers=headers,
    )


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


# Set by a handler of an OpenAI-compatible route: its errors take OpenAI's shape, which the SDKs read.
OPENAI_ERRORS = web.RequestKey("openai_errors", bool)
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def _openai_shaped(resp: web.Response) -> web.Response:
    """`{"error": code, "message"}` as OpenAI writes it: `{"error": {"message", "type", "param", "code"}}`."""
    assert isinstance(resp.body, bytes)
    body = orjson.loads(resp.body)
    kind = _OPENAI_TYPES.get(resp.status, "server_error" if resp.status >= 500 else "invalid_request_error")
    error = {"message": body.get("message", ""), "type": kind, "param": None, "code": body.get("error")}
    resp.body = orjson.dumps({"error": error})
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resp = await _errors(request, handler)
    if request.get(OPENAI_ERRORS) and isinstance(resp, web.Response) and resp.status >= 400:
        return _openai_shaped(resp)
    return resp


async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        resp = json_error(e.status, e.code, e.message, e.headers, e.extra)
        if e.headers.get("Connection") == "close":
            # Close at once: aiohttp would otherwise linger, reading the rest of a body that is not coming.
            resp.force_close()
        return resp
    except InvalidPosition as e:
        return json_error(400, "invalid_id", str(e))
    except ChannelClosed:
        return json_error(409, "channel_closed", "the channel was closed; delete it before publishing again")
    except ChannelOwned:
        # Whoever asks, with whatever rights: a generation's channel is written by its worker alone.
        return json_error(409, "generation_channel", "this channel belongs to a generation; only its worker writes it")
    except IdempotencyConflict:
        return json_error(
            422, "idempotency_key_reused", "this Idempotency-Key was already used for other events on this channel"
        )
    except NotReplicated as e:
        log.warning("not replicated during %s %s: %s", request.method, request.path, e)
        message = (
            "stored, but not yet confirmed by the replicas it must reach; it may be lost in a failover. Retry: with "
            "the same Idempotency-Key a retry stores it at most once"
        )
        return json_error(503, "not_replicated", message, {"Retry-After": "1"})
    except BackendUnavailable as e:
        log.warning("backend unavailable during %s %s: %s", request.method, request.path, e)
        return json_error(503, "backend_unavailable", "the backend is unavailable; retry later", {"Retry-After": "1"})
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        message = e.reason if e.status != 413 else "request body is over the size limit"
        return json_error(e.status, code, message, {k: v for k, v in e.headers.items() if k == "Allow"})
    except Exception:
        # Details go to the log, never to the client.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal", "internal error")
