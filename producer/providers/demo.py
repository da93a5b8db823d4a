"""DemoProvider: streams a built-in text at a set pace, with no network, so a hub shows real generations offline.

Model "demo" (or empty) streams the text once; "demo:N" streams N tokens (1 to DEMO_MAX_TOKENS), cycling through it
(for load tests and long generations). `max_tokens` ends it early with finish_reason "length". Token counts are words.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import aiohttp

from ssecore.chat import content_text
from ssecore.demo import DEMO_MAX_TOKENS, TOKENS, demo_tokens

from .base import Finish, GenerationRequest, ProviderError, StreamItem, TextDelta

__all__ = ["DEMO_MAX_TOKENS", "DemoProvider", "demo_tokens"]

_YIELD_EVERY = 32


class DemoProvider:
    name = "demo"
    kind = "demo"

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
        prompt = sum(len(content_text(m.get("content")).split()) for m in request.messages)
        for i in range(limit):
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            elif i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # full speed still lets the rest of the process run
            text = TOKENS[i % len(TOKENS)]
            yield TextDelta(text if i or not text.startswith(" ") else text.lstrip())
        yield Finish("length" if limit < count else "stop", input_tokens=prompt, output_tokens=limit)
