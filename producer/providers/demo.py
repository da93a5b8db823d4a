"""DemoProvider: streams a built-in text at a set pace, with no network, so a hub shows real generations offline.

Model "demo" (or empty) streams the text once; "demo:N" streams N tokens, cycling through it (for load tests and long
generations). `max_tokens` ends it early with finish_reason "length". Token counts are words.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

import aiohttp

from .base import Finish, GenerationRequest, StreamItem, TextDelta

__all__ = ["DemoProvider"]

TEXT = (
    "Server-Sent Events are a simple way to stream text from a server to a browser. Each token of this answer is "
    "appended to a Redis Stream, and the stream's entry id becomes the event id, so a browser that loses its "
    "connection reconnects with Last-Event-ID and receives exactly the tokens it missed, from any hub node. The "
    "generation itself runs in a worker, apart from any browser: close the tab, reload the page, or stop a hub node, "
    "and the answer still arrives whole. When it is finished, the last event closes the channel, and a reconnect "
    "after it is told there is nothing more to wait for."
)
_TOKENS = re.findall(r"\s*\S+", TEXT)
_YIELD_EVERY = 32


class DemoProvider:
    name = "demo"

    def __init__(self, tokens_per_s: float = 30.0) -> None:
        self._delay_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0

    async def stream(
        self, session: aiohttp.ClientSession, request: GenerationRequest
    ) -> AsyncGenerator[StreamItem, None]:
        count = len(_TOKENS)
        if request.model.startswith("demo:"):
            try:
                count = max(1, int(request.model.split(":", 1)[1]))
            except ValueError:
                count = len(_TOKENS)
        limit = min(count, request.max_tokens) if request.max_tokens is not None else count
        prompt = sum(len(m["content"].split()) for m in request.messages)
        for i in range(limit):
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            elif i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # full speed still lets the rest of the process run
            text = _TOKENS[i % len(_TOKENS)]
            yield TextDelta(text if i or not text.startswith(" ") else text.lstrip())
        yield Finish("length" if limit < count else "stop", input_tokens=prompt, output_tokens=limit)
