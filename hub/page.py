"""The demo page (hub/static, no build step): `/` and its files under `/static/`. Nothing else depends on it."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_DIR", "is_page", "routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC_PREFIX = "/static/"
# What the page needs and nothing more: its own scripts and stylesheet (no inline code, so an injected <script> does
# not run), calls to this hub only, the empty data: icon, and no framing (clickjacking).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def is_page(path: str) -> bool:
    """Whether `path` is the demo page or one of its files."""
    return path == "/" or path.startswith(_STATIC_PREFIX)


routes = web.RouteTableDef()


@routes.get("/", allow_head=False)
async def index(request: web.Request) -> web.FileResponse:
    # Revalidated on every load, so a page from a newer hub is never mixed with a cached script of an older one.
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


routes.static(_STATIC_PREFIX.rstrip("/"), STATIC_DIR, append_version=False)
