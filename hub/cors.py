"""CORS: which browser origins may call the hub, and the preflight answer.

Origins are matched exactly. With `*` the hub allows any origin but never with credentials (cookies), and never
reflects the caller's origin; with a list, the matching origin is echoed and credentials are allowed.
"""

from __future__ import annotations

from aiohttp import web

from .errors import Handler, json_error

__all__ = ["Cors"]

_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
# Last-Event-ID: EventSource polyfills and fetch readers send it on reconnect. Idempotency-Key: a browser publisher's
# retries, answered with Idempotent-Replayed.
_ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, Accept, Idempotency-Key"
_EXPOSE_HEADERS = "Retry-After, WWW-Authenticate, Idempotent-Replayed"
_MAX_AGE_S = "600"


class Cors:
    def __init__(self, origins: str) -> None:
        entries = {o.strip().rstrip("/") for o in origins.split(",") if o.strip()}
        self.any_origin = "*" in entries
        self.origins = frozenset(entries - {"*"})

    def allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def headers_for(self, origin: str | None) -> dict[str, str]:
        if origin is None or not self.allowed(origin):
            return {}
        if origin in self.origins:
            return {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": _EXPOSE_HEADERS,
                "Vary": "Origin",
            }
        return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": _EXPOSE_HEADERS}

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Add the CORS headers to every response, streams included (they are prepared before any event)."""
        for name, value in self.headers_for(request.headers.get("Origin")).items():
            if name == "Vary" and "Vary" in response.headers:
                response.headers["Vary"] = response.headers["Vary"] + ", Origin"
            else:
                response.headers[name] = value

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Every path answers a preflight, whatever methods its routes have.
        if request.method == "OPTIONS":
            return await self.preflight(request)
        return await handler(request)

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is None or not self.allowed(origin):
            return json_error(403, "cors_origin_not_allowed", "this origin may not call the hub")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": _ALLOW_METHODS,
                "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                "Access-Control-Max-Age": _MAX_AGE_S,
            },
        )
