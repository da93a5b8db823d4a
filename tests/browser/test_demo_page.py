"""The demo page (hub/static) in a real Chromium: a generation streams in token by token and ends with exactly the text
the worker wrote, through a node killed under it behind nginx, a page reload, and a channel deleted or trimmed under
it; with the weather tool, the page runs an agent loop. Screenshots of the finished pages are saved in each test's
artifacts folder."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Page, Route

from tests.scaleout.cluster import Cluster, find_nginx, metric
from tests.support import HubProcess, RedisServer, collect, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Every change of the page's connection state, in order, kept in window.states (installed again after a reload).
WATCH_STATES = """
() => {
    const el = document.getElementById("state");
    window.states = [el.dataset.state];
    new MutationObserver(() => {
        const s = el.dataset.state;
        if (window.states[window.states.length - 1] !== s) window.states.push(s);
    }).observe(el, {attributes: true, attributeFilter: ["data-state"]});
}
"""


def hub_process(*args: str, tokens_per_s: float = 30) -> Iterator[HubProcess]:
    # The embedded backend and its embedded worker (anonymous): the page works with nothing configured.
    node = HubProcess(*args, env={"PRODUCER_DEMO_TOKENS_PER_S": str(tokens_per_s)})
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def hub() -> Iterator[HubProcess]:
    yield from hub_process()


@pytest.fixture
def short_history_hub() -> Iterator[HubProcess]:
    # Ten events kept per channel: a client that is away for a generation comes back to a trimmed channel.
    yield from hub_process("--history", "10", tokens_per_s=40)


def token_text(events: list[tuple[str, str]]) -> str:
    """The answer a channel's (event, data) pairs spell: its tokens' text, from after the last reset."""
    text = ""
    for name, data in events:
        if name == "reset":
            text = ""
        elif name == "token":
            text += json.loads(data)["text"]
    return text


async def stored_text(base_url: str, channel: str) -> str:
    """What the hub holds for a finished channel, read from its start over the HTTP API."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/v1/channels/{channel}/events?last_event_id=0") as resp:
            assert resp.status == 200
            events = await collect(resp, timeout_s=20)
    assert events and events[-1].event in ("done", "error"), events[-3:]
    return token_text([(ev.event, ev.data) for ev in events])


async def start_generation(page: Page, url: str, model: str) -> dict[str, Any]:
    """Open the page, ask for a demo generation of `model`, and return what the page saved of it."""
    await page.goto(url)
    await page.evaluate(WATCH_STATES)
    await page.fill("#model", model)
    await page.click("#send")
    await page.wait_for_function("() => document.getElementById('answer').textContent.length > 0", timeout=15_000)
    return await saved(page)


async def saved(page: Page) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(await page.evaluate("() => sessionStorage.getItem('sse-hub-demo')"))
    return state


async def wait_state(page: Page, state: str, timeout_s: float = 30) -> None:
    await page.wait_for_function(
        "(s) => document.getElementById('state').dataset.state === s", arg=state, timeout=timeout_s * 1000
    )


async def states(page: Page) -> list[str]:
    seen: list[str] = await page.evaluate("() => window.states")
    return seen


async def answer(page: Page) -> str:
    return await page.text_content("#answer") or ""


async def test_a_generation_streams_into_the_page_token_by_token(hub: HubProcess, page: Page, artifacts: Path) -> None:
    job = await start_generation(page, f"{hub.url}/", "demo:60")
    lengths = set()
    deadline = time.monotonic() + 30
    while await page.get_attribute("#state", "data-state") != "finished":
        assert time.monotonic() < deadline, await states(page)
        lengths.add(len(await answer(page)))
        await asyncio.sleep(0.02)
    expected = await stored_text(hub.url, job["channel"])
    assert await answer(page) == expected and len(expected) > 100
    # Progressively, not all at once: the page was seen at many lengths between empty and whole.
    assert len(lengths - {0, len(expected)}) >= 5, sorted(lengths)
    assert await states(page) == ["idle", "connecting", "streaming", "finished"]
    await page.screenshot(path=artifacts / "finished.png", full_page=True)


@pytest.mark.timeout(120)
@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (make test installs it)")
async def test_a_node_killed_under_the_page_behind_nginx_loses_nothing(
    redis_server: RedisServer, page: Page, artifacts: Path
) -> None:
    cluster = Cluster(redis_server, tokens_per_s=25)
    try:
        cluster.start()
        async with aiohttp.ClientSession() as session:
            for node in cluster.nodes:
                await cluster.wait_ready(node, session)
            job = await start_generation(page, f"{cluster.url}/", "demo:120")
            await page.wait_for_function("() => document.getElementById('answer').textContent.length > 60")
            # The node holding the page's stream: the only one with a stream open.
            serving = [n for n in cluster.nodes if await metric(session, n, "hub_connections_open") == 1]
            assert len(serving) == 1, [await metric(session, n, "hub_connections_open") for n in cluster.nodes]
            shown_before = await answer(page)
            cluster.kill(serving[0])
            await wait_state(page, "finished", timeout_s=60)
        entries = await cluster.entries(job["channel"])
        expected = token_text([(e.event, e.data) for e in entries])
        assert await answer(page) == expected
        assert expected.startswith(shown_before) and len(expected) > len(shown_before)
        seen = await states(page)
        # The drop was seen and the stream came back resumed, before it finished.
        assert "reconnecting" in seen and "resumed" in seen[seen.index("reconnecting") :], seen
        assert seen[-1] == "finished"
        await page.screenshot(path=artifacts / "after-node-kill.png", full_page=True)
    finally:
        await cluster.aclose()


async def test_a_page_reloaded_mid_generation_ends_with_the_exact_text(
    hub: HubProcess, page: Page, artifacts: Path
) -> None:
    job = await start_generation(page, f"{hub.url}/", "demo:90")
    await asyncio.sleep(0.5)
    before = await saved(page)
    assert before["status"] == "streaming" and before["lastEventId"]
    await page.reload()
    await page.evaluate(WATCH_STATES)
    # Rebuilt from what the page saved, then resumed from the id it saved with it.
    await wait_state(page, "finished")
    assert "resumed" in await states(page)
    expected = await stored_text(hub.url, job["channel"])
    assert await answer(page) == expected
    await page.screenshot(path=artifacts / "after-reload.png", full_page=True)


async def test_a_channel_deleted_under_the_page_shows_the_reset_and_no_stale_text(
    hub: HubProcess, page: Page, artifacts: Path
) -> None:
    job = await start_generation(page, f"{hub.url}/", "demo:400")
    await page.wait_for_function("() => document.getElementById('answer').textContent.length > 20")
    async with aiohttp.ClientSession() as session:
        async with session.delete(f"{hub.url}/v1/channels/{job['channel']}") as resp:
            assert resp.status == 204
    await wait_state(page, "error", timeout_s=10)
    assert "deleted" in (await page.text_content("#notice") or "")
    assert await answer(page) == ""
    await asyncio.sleep(1.0)  # and nothing comes back
    assert await answer(page) == "" and (await saved(page))["text"] == ""
    await page.screenshot(path=artifacts / "deleted.png", full_page=True)


async def test_a_page_back_after_its_channel_was_trimmed_shows_the_reset_and_only_what_remains(
    short_history_hub: HubProcess, page: Page, artifacts: Path
) -> None:
    hub = short_history_hub
    job = await start_generation(page, f"{hub.url}/", "demo:120")
    stale = await answer(page)

    # The page goes away (reloaded, its stream requests failing) while the generation runs to its end.
    async def unreachable(route: Route) -> None:
        await route.abort()

    await page.route("**/events?*", unreachable)
    await page.reload()
    await page.evaluate(WATCH_STATES)
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 30
        while True:
            async with session.get(f"{hub.url}/v1/generations/{job['id']}") as resp:
                if (await resp.json())["status"] == "done":
                    break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert (await saved(page))["status"] == "streaming"
    await page.unroute("**/events?*", unreachable)

    # Back: its position was trimmed away. The page says so and shows only what the hub still has.
    await wait_state(page, "finished", timeout_s=30)
    assert "no longer kept" in (await page.text_content("#notice") or "")
    expected = await stored_text(hub.url, job["channel"])
    assert stale and await answer(page) == expected
    await page.screenshot(path=artifacts / "trimmed.png", full_page=True)


CROSS_ORIGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>elsewhere</title>
<script src="{hub}/static/hub-client.js"></script>
<script>
  window.received = [];
  window.states = [];
  window.subscription = HubClient.subscribe("{hub}/v1/channels/elsewhere/events", {{
    lastEventId: "{after}",
    on: {{
      token: (data, ev) => window.received.push([ev.lastEventId, data.text]),
      message: (data, ev) => window.received.push([ev.lastEventId, data]),
    }},
    onState: (name, detail) => window.states.push([name, detail.replayed === undefined ? null : detail.replayed]),
  }});
</script>"""


async def test_hub_client_resumes_from_another_origin(page: Page, artifacts: Path) -> None:
    """A page of another site embeds hub-client.js from the hub and follows a channel across origins (the hub's CORS
    settings list that site): the first connection resumes from a given id, and the client counts what it replayed."""
    site_port = free_port()
    origin = f"http://127.0.0.1:{site_port}"
    node = HubProcess("--cors-origins", origin)
    node.start()
    runner: web.AppRunner | None = None
    try:
        async with aiohttp.ClientSession() as session:
            body = [{"event": "token", "data": {"text": f"t{i}"}} for i in range(5)]
            async with session.post(f"{node.url}/v1/channels/elsewhere/events", json=body) as resp:
                ids: list[str] = (await resp.json())["ids"]
            html = CROSS_ORIGIN_PAGE.format(hub=node.url, after=ids[1])

            async def site(request: web.Request) -> web.Response:
                return web.Response(text=html, content_type="text/html")

            app = web.Application()
            app.router.add_get("/", site)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", site_port).start()

            await page.goto(f"{origin}/")
            await page.wait_for_function("() => window.received.length >= 3", timeout=10_000)
            one = {"event": "token", "data": {"text": "t5"}}
            async with session.post(f"{node.url}/v1/channels/elsewhere/events", json=one) as resp:
                [live] = (await resp.json())["ids"]
            # An unnamed event (type "message"): once, though the page has a handler for it.
            async with session.post(f"{node.url}/v1/channels/elsewhere/events", json={"data": "plain"}) as resp:
                [plain] = (await resp.json())["ids"]
            await page.wait_for_function("() => window.received.length >= 5", timeout=10_000)
            await asyncio.sleep(0.2)
        received = await page.evaluate("() => window.received")
        assert received == [[ids[2], "t2"], [ids[3], "t3"], [ids[4], "t4"], [live, "t5"], [plain, "plain"]]

        # The page publishes too, with an Idempotency-Key, across origins: the preflight allows the header and the
        # answer to the retry shows Idempotent-Replayed.
        answers = await page.evaluate(
            """async (url) => {
                const post = () => fetch(url, {method: "POST", body: JSON.stringify({data: "from the page"}),
                    headers: {"Content-Type": "application/json", "Idempotency-Key": "page-1"}});
                const first = await post(), retry = await post();
                return [[first.status, first.headers.get("Idempotent-Replayed"), (await first.json()).ids],
                        [retry.status, retry.headers.get("Idempotent-Replayed"), (await retry.json()).ids]];
            }""",
            f"{node.url}/v1/channels/elsewhere/events",
        )
        assert answers[0][:2] == [201, None] and answers[1][:2] == [201, "true"] and answers[0][2] == answers[1][2]
        # Resumed from ids[1]: three events were replayed (the live one is not counted).
        await page.wait_for_function(
            "() => window.states.some(([name, n]) => name === 'resumed' && n === 3)", timeout=10_000
        )
        await page.screenshot(path=artifacts / "cross-origin.png")
    finally:
        if runner is not None:
            await runner.cleanup()
        node.close()


STREAM = re.compile(r".*/v1/channels/live/events(\?.*)?$")  # the stream's URL, with or without a position
LIVE_PAGE = """<!doctype html><meta charset="utf-8"><title>live</title>
<script src="/static/hub-client.js"></script>
<script>
  window.received = [];
  window.states = [];
  window.subscription = HubClient.subscribe("/v1/channels/live/events", {
    on: { token: (data, ev) => window.received.push([ev.lastEventId, data]) },
    onState: (name) => window.states.push(name),
  });
</script>"""


async def test_a_live_subscription_that_the_browser_gave_up_on_resumes_without_a_gap(
    page: Page, artifacts: Path
) -> None:
    """hub-client subscribed live (no position). Its stream ends (here: --max-connection-age), the browser's own
    reconnect is refused (a 503, as from a draining node that no balancer retried) and EventSource gives up. What
    is published meanwhile must still arrive when hub-client reconnects: it knew the live position all along."""
    node = HubProcess("--max-connection-age", "1", "--retry-ms", "100")
    node.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{node.url}/v1/channels/live/events"

            async def publish(data: str) -> str:
                async with session.post(url, json={"event": "token", "data": data}) as resp:
                    ids: list[str] = (await resp.json())["ids"]
                    return ids[0]

            await publish("before")  # not for a live subscriber

            async def refused(route: Route) -> None:
                await route.fulfill(status=503, body="draining")

            await page.route(f"{node.url}/", lambda route: route.fulfill(body=LIVE_PAGE, content_type="text/html"))
            await page.goto(f"{node.url}/")
            await page.wait_for_function("() => window.states.includes('streaming')", timeout=10_000)
            # Before any event arrived: the page knows no event id, only the position it started from.
            await page.route(STREAM, refused)
            # The stream ages out; the reconnects are refused until the route is lifted.
            await page.wait_for_function("() => window.states.includes('reconnecting')", timeout=10_000)
            await asyncio.sleep(0.5)
            missed = await publish("while away")
            await page.unroute(STREAM, refused)
            await page.wait_for_function("() => window.received.length >= 1", timeout=15_000)
            await asyncio.sleep(0.2)
        assert await page.evaluate("() => window.received") == [[missed, "while away"]]
        await page.screenshot(path=artifacts / "live-resumed.png")
    finally:
        node.close()


async def test_stop_cancels_the_generation_and_the_page_says_so(hub: HubProcess, page: Page) -> None:
    job = await start_generation(page, f"{hub.url}/", "demo:400")
    await page.click("#stop")
    await wait_state(page, "finished", timeout_s=15)
    assert "cancelled" in (await page.text_content("#notice") or "")
    expected = await stored_text(hub.url, job["channel"])
    assert await answer(page) == expected and 0 < len(expected)
    assert await page.is_disabled("#stop") and not await page.is_disabled("#send")


# What the page's transcript holds: each block's class and text, and each tool call's arguments as they filled in.
TRANSCRIPT = """
() => [...document.getElementById("answer").children].map((node) => ({
    kind: node.className,
    text: node.textContent,
    name: node.querySelector(".name")?.textContent ?? null,
    args: node.querySelector(".args")?.textContent ?? null,
    complete: node.dataset.complete ?? null,
    color: getComputedStyle(node).color,
}))
"""
WATCH_CALLS = """
() => {
    window.callArgs = [];
    new MutationObserver(() => {
        const args = document.querySelector("#answer .tool-call .args");
        const seen = window.callArgs;
        if (args && seen[seen.length - 1] !== args.textContent) seen.push(args.textContent);
    }).observe(document.getElementById("answer"), {childList: true, subtree: true, characterData: true});
}
"""


# The page's POST /v1/generations requests, in order: each body as sent, and the job the hub answered with.
RECORD_POSTS = """
() => {
    window.posts = [];
    const send = window.fetch;
    window.fetch = (url, init) => {
        const answer = send(url, init);
        if (String(url).endsWith("v1/generations") && init && init.method === "POST") {
            const post = {body: JSON.parse(init.body), job: null};
            window.posts.push(post);
            answer.then((resp) => resp.clone().json()).then((job) => { post.job = job; });
        }
        return answer;
    };
}
"""


async def record(base_url: str, job_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/v1/generations/{job_id}") as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            return body


async def test_the_weather_tool_runs_an_agent_loop_in_the_page(hub: HubProcess, page: Page, artifacts: Path) -> None:
    await page.goto(f"{hub.url}/")
    await page.evaluate(WATCH_STATES)
    await page.evaluate(WATCH_CALLS)
    await page.evaluate(RECORD_POSTS)
    await page.check("#weather")
    await page.select_option("#effort", "low")
    assert await page.input_value("#prompt") == "What is the weather in Paris?"
    await page.click("#send")
    # The second answer quotes the tool's result, and the loop ends there.
    await page.wait_for_function(
        """() => document.getElementById("state").dataset.state === "finished" &&
            [...document.querySelectorAll("#answer .text")].some((n) => n.textContent.includes("tool said"))""",
        timeout=30_000,
    )
    shown = await page.evaluate(TRANSCRIPT)
    assert [item["kind"] for item in shown] == ["reasoning", "text", "tool-call", "tool-result", "reasoning", "text"]
    thinking, said, call, result, _, final = shown
    # The call, marked as one, complete, with arguments made from the tool's schema; seen filling in before that.
    assert call["name"] == "get_weather" and call["complete"] == "true" and call["text"].startswith("tool call")
    assert json.loads(call["args"]) == {"city": "Paris"}
    filling = await page.evaluate("() => window.callArgs")
    assert filling[-1] == call["args"] and any(0 < len(a) < len(call["args"]) for a in filling), filling
    # The page ran the tool, sent its result back, and the model's answer quotes it.
    weather = {"city": "Paris", "temp_c": 21, "sky": "sunny"}
    assert result["name"] == "get_weather" and json.loads(result["args"]) == weather
    assert final["text"] == f"The get_weather tool said: {result['args']}."
    # Reasoning is shown apart from the answer, greyed.
    assert "get_weather" in thinking["text"] and thinking["color"] != said["color"]

    # Two requests: the second is the first's messages, the first answer (done.message) verbatim, the tool's result.
    posts: list[dict[str, Any]] = await page.evaluate("() => window.posts")
    [(first, first_job), (second, second_job)] = [(post["body"], post["job"]) for post in posts]
    assert first["tools"][0]["function"]["name"] == "get_weather" and first["reasoning_effort"] == "low"
    first_answer = (await record(hub.url, first_job["id"]))["message"]
    assert first_answer["content"] == said["text"] and first_answer["reasoning"] == thinking["text"]
    [call_id] = [c["id"] for c in first_answer["tool_calls"]]
    tool_result = {"role": "tool", "tool_call_id": call_id, "content": result["args"]}
    assert second["messages"] == [*first["messages"], first_answer, tool_result]
    assert second["tools"] == first["tools"]
    assert (await record(hub.url, second_job["id"]))["message"]["content"] == final["text"]
    assert await answer(page) == "".join(item["text"] for item in shown)
    assert (await states(page))[-1] == "finished" and not await page.is_disabled("#send")
    await page.screenshot(path=artifacts / "agent-loop.png", full_page=True)


async def test_a_page_reloaded_during_the_tool_call_carries_the_agent_loop_on(
    hub: HubProcess, page: Page, artifacts: Path
) -> None:
    await page.goto(f"{hub.url}/")
    await page.check("#weather")
    await page.select_option("#effort", "high")
    await page.click("#send")
    await page.wait_for_selector("#answer .reasoning", timeout=15_000)
    first = await saved(page)
    assert first["status"] == "streaming" and first["agent"]["tools"]
    await page.reload()
    # The first answer resumes where it was; the page still runs the tool and asks for the second.
    await page.wait_for_function(
        """() => document.getElementById("state").dataset.state === "finished" &&
            document.querySelectorAll("#answer .text").length === 2""",
        timeout=30_000,
    )
    shown = await page.evaluate(TRANSCRIPT)
    assert [item["kind"] for item in shown] == ["reasoning", "text", "tool-call", "tool-result", "reasoning", "text"]
    # Nothing lost or doubled across the reload: the first answer is what its generation recorded.
    message = (await record(hub.url, first["id"]))["message"]
    assert [shown[0]["text"], shown[1]["text"]] == [message["reasoning"], message["content"]]
    assert json.loads(shown[2]["args"]) == json.loads(message["tool_calls"][0]["function"]["arguments"])
    second = await saved(page)
    assert second["id"] != first["id"]
    assert shown[-1]["text"] == (await record(hub.url, second["id"]))["message"]["content"]
    assert shown[-1]["text"].startswith("The get_weather tool said:")
    await page.screenshot(path=artifacts / "agent-loop-reloaded.png", full_page=True)
