"""The OpenAPI 3.1 document of the hub's HTTP API (hub/openapi.json, kept in the repository), served as it is."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

__all__ = ["DOCUMENT", "routes"]

# Read once, at import: a package built without the file fails at start, not at the first request.
DOCUMENT: bytes = resources.files("hub").joinpath("openapi.json").read_bytes()

routes = web.RouteTableDef()


# No authentication, like /healthz: the document only describes the API.
@routes.get("/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=DOCUMENT, content_type="application/json")
