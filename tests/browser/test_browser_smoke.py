"""The browser infrastructure end to end: a real EventSource in Chromium receives what is published to a real hub
process, with the ids the publish returned."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page

from tests.support import HubProcess

pytestmark = pytest.mark.e2e

# Opens an EventSource and resolves once the stream is open, so that what is published next is live for it; every
# `token` event it receives is kept in window.received.
OPEN_EVENT_SOURCE = """
(url) => new Promise((resolve, reject) => {
    window.received = [];
    const es = new EventSource(url);
    window.eventSource = es;
    es.addEventListener("token", (e) => window.received.push({id: e.lastEventId, data: e.data}));
    es.onopen = () => resolve();
    es.onerror = () => reject(new Error(`EventSource failed to open, readyState ${es.readyState}`));
})
"""


@pytest.fixture
def hub() -> Iterator[HubProcess]:
    # The embedded backend, anonymous: nothing else to start.
    node = HubProcess()
    try:
        node.start()
        yield node
    finally:
        node.close()


async def test_event_source_receives_published_events(hub: HubProcess, page: Page, artifacts: Path) -> None:
    # A page on the hub's origin, so that the EventSource is same-origin and needs no CORS.
    await page.goto(f"{hub.url}/healthz")
    await page.evaluate(OPEN_EVENT_SOURCE, f"{hub.url}/v1/channels/smoke/events")

    body = [{"event": "token", "data": "a"}, {"event": "token", "data": "b"}]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{hub.url}/v1/channels/smoke/events", json=body) as resp:
            assert resp.status == 201, await resp.text()
            ids: list[str] = (await resp.json())["ids"]
    assert len(ids) == 2

    await page.wait_for_function("() => window.received.length >= 2", timeout=10_000)
    # A moment for a third event, which would be a duplicate.
    await asyncio.sleep(0.2)
    received: list[dict[str, Any]] = await page.evaluate("() => window.received")
    assert received == [{"id": ids[0], "data": "a"}, {"id": ids[1], "data": "b"}]
    await page.screenshot(path=artifacts / "smoke.png")
