"""Headers for the browser's sake: on every response no MIME sniffing, no referrer and a Server header that names no
versions; on the demo page and its files a Content-Security-Policy (which also forbids framing)."""

from __future__ import annotations

from aiohttp import web

from .page import CONTENT_SECURITY_POLICY, is_page

__all__ = ["security_headers"]

# What every response carries. nosniff: a browser must not run a JSON body or an event stream as a script or a page.
_ALWAYS = {
    "X-Content-Type-Options": "nosniff",
    # aiohttp's default names Python's and its own versions; an attacker need not be told which fixes are missing.
    "Server": "sse-hub",
    "Referrer-Policy": "no-referrer",
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for every response the app makes, streams and static files included."""
    response.headers.update(_ALWAYS)
    if is_page(request.path):
        # Not on the API's answers: JSON and event streams are never rendered (nosniff sees to that), and a policy
        # there would only get in the way of a page that opens one as a document to call the API from it.
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
