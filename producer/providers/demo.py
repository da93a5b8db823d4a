"""DemoProvider: streams a built-in text at a set pace, with no network, so a hub shows real generations offline.

Model "demo" (or empty) streams the text once; "demo:N" streams N tokens (1 to DEMO_MAX_TOKENS), cycling through it
(for load tests and long generations). `max_tokens` ends it early with finish_reason "length". Token counts are words.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

import aiohttp

from .base import Finish, GenerationRequest, ProviderError, StreamItem, TextDelta

__all__ = ["DEMO_MAX_TOKENS", "DemoProvider", "demo_tokens"]

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
# A demo generation holds a worker slot as long as it runs: 100,000 tokens take 56 minutes at the default 30/s.
DEMO_MAX_TOKENS = 100_000
_DEMO_N = re.compile(r"demo:([1-9][0-9]{0,5})")


def demo_tokens(model: str) -> int:
    """How many tokens model `model` streams: the text once for any model but "demo:N", N for that. Raises ValueError
    for a "demo:" model whose N is not a whole number from 1 to DEMO_MAX_TOKENS."""
    if not model.startswith("demo:"):
        return len(_TOKENS)
    found = _DEMO_N.fullmatch(model)
    if found is None or int(found[1]) > DEMO_MAX_TOKENS:
        raise ValueError(f'the demo model is "demo" or "demo:N" with N from 1 to {DEMO_MAX_TOKENS}')
    return int(found[1])


class DemoProvider:
    name = "demo"

    def __init__(self, tokens_per_s: float = 30.0) -> None:
        self._delay_s = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0

    async def stream(
        self, session: aiohttp.ClientSession, request: GenerationRequest
    ) -> AsyncGenerator[StreamItem, None]:
        try:
            count = demo_tokens(request.model)
        except ValueError as e:
            # The hub refuses such a job; one that reached the queue another way must not hold a slot for ever either.
            raise ProviderError("bad_request", str(e)) from None
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
