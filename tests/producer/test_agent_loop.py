"""A whole agent loop through the hub's job API, on each provider: a request with tools streams a tool call, the
answer's `done.message` goes back verbatim with the tool's result, and the second generation answers. The embedded
worker calls the fake provider server, which speaks each provider's real wire format and checks what it is sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.producer.agent_turns import FIRST_TURN, WEATHER
from tests.producer.fake_providers import FakeProviders
from tests.support import collect

Client = TestClient[Any, Any]
# Each provider, and the signature its thinking carries (it must come back in the second request).
PROVIDERS = {"openai": None, "openai-responses": "sig-fake-1", "anthropic": "sig-fake-1", "gemini": "sig-fake-1"}


async def generate(hub: Client, body: dict[str, Any]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """Start a generation and read its channel to the end: the events, and the terminal event's data."""
    resp = await hub.post("/v1/generations", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    job = await resp.json()
    assert resp.status == 202, job
    events = [
        (e.event, orjson.loads(e.data))
        for e in await collect(await hub.get(job["events_url"] + "?last_event_id=0"), timeout_s=20)
    ]
    name, done = events[-1]
    assert name == "done", events
    record = await (await hub.get(f"/v1/generations/{job['id']}")).json()
    # A late reader gets the whole answer in one read.
    assert record["status"] == "done" and record["message"] == done["message"]
    return events, done


@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_an_agent_loop_runs_on_each_provider(fake_hub: Client, fake: FakeProviders, provider: str) -> None:
    hub = fake_hub
    first = {
        "provider": provider,
        "model": "tool",
        "messages": FIRST_TURN,
        "tools": [WEATHER],
        "reasoning_effort": "low",
    }
    events, done = await generate(hub, first)
    names = [name for name, _ in events]
    assert names[0] == "start" and "reasoning" in names and "tool_call_delta" in names
    (call,) = [data for name, data in events if name == "tool_call"]
    assert (call["index"], call["name"], orjson.loads(call["arguments"])) == (0, "get_weather", {"city": "Paris"})
    assert done["finish_reason"] == "tool_calls"
    message = done["message"]
    assert message["tool_calls"] == [
        {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}
    ]
    assert message["reasoning"] == "Weather needed."

    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 21}'}
    second = {**first, "messages": [*FIRST_TURN, message, result]}
    events, done = await generate(hub, second)
    assert "".join(data["text"] for name, data in events if name == "token") == "It is sunny."
    assert done["finish_reason"] == "stop" and done["message"]["content"] == "It is sunny."
    assert "tool_calls" not in done["message"]
    sent = fake.requests[-1]
    assert sent.provider.startswith(provider.split("-")[0]) and sent.attempt == 2
    # What the provider needs to go on (its thinking's signature) went back with the call.
    signature = PROVIDERS[provider]
    if signature is not None:
        assert signature.encode() in orjson.dumps(sent.body)


async def test_a_finish_reason_of_a_providers_own_ends_a_stop_and_is_told_beside_it(
    fake_hub: Client, fake: FakeProviders
) -> None:
    from tests.producer.fake_providers import Behaviour

    fake.behaviours["pausing"] = Behaviour(finish_reason="pause_turn")  # Anthropic's, for a long server-side turn
    _, done = await generate(fake_hub, {"provider": "anthropic", "model": "pausing", "messages": FIRST_TURN})
    assert (done["finish_reason"], done["provider_finish_reason"]) == ("stop", "pause_turn")
