"""The demo model, which needs no network: its text, and what a "demo:N" model asks for.

The job contract checks a demo job's model with it (the hub refuses a bad one before queueing); the demo provider
streams it. Model "demo" (or empty) is the text once; "demo:N" is N tokens (1 to DEMO_MAX_TOKENS), cycling through it.
"""

from __future__ import annotations

import re

__all__ = ["DEMO_MAX_TOKENS", "TEXT", "TOKENS", "demo_tokens"]

TEXT = (
    "Server-Sent Events are a simple way to stream text from a server to a browser. Each token of this answer is "
    "appended to a Redis Stream, and the stream's entry id becomes the event id, so a browser that loses its "
    "connection reconnects with Last-Event-ID and receives exactly the tokens it missed, from any hub node. The "
    "generation itself runs in a worker, apart from any browser: close the tab, reload the page, or stop a hub node, "
    "and the answer still arrives whole. When it is finished, the last event closes the channel, and a reconnect "
    "after it is told there is nothing more to wait for."
)
TOKENS = re.findall(r"\s*\S+", TEXT)
# A demo generation holds a worker slot as long as it runs: 100,000 tokens take 56 minutes at the default 30/s.
DEMO_MAX_TOKENS = 100_000
_DEMO_N = re.compile(r"demo:([1-9][0-9]{0,5})")


def demo_tokens(model: str) -> int:
    """How many tokens model `model` streams: the text once for any model but "demo:N", N for that. Raises ValueError
    for a "demo:" model whose N is not a whole number from 1 to DEMO_MAX_TOKENS."""
    if not model.startswith("demo:"):
        return len(TOKENS)
    found = _DEMO_N.fullmatch(model)
    if found is None or int(found[1]) > DEMO_MAX_TOKENS:
        raise ValueError(f'the demo model is "demo" or "demo:N" with N from 1 to {DEMO_MAX_TOKENS}')
    return int(found[1])
