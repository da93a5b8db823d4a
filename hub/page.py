"""The demo page (hub/static, no build step): `/` and its files under `/static/`. Nothing else depends on it."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["STATIC_DIR", "routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

routes = web.RouteTableDef()


@routes.get("/", allow_head=False)
async def index(request: web.Request) -> web.FileResponse:
    # Revalidated on every load, so a page from a newer hub is never mixed with a cached script of an older one.
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


routes.static("/static", STATIC_DIR, append_version=False)
