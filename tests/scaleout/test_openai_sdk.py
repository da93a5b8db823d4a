"""The official OpenAI SDK (the `openai` package), unchanged, against three hub nodes behind nginx: chat completions
streamed with tools on each provider (the fake provider server speaks each one's wire format), the tool result sent
back as the SDK's users do, a whole answer without streaming, and errors the SDK raises as its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from tests.producer.agent_turns import WEATHER
from tests.producer.fake_providers import TEST_API_KEY, FakeProviders
from tests.scaleout.cluster import Cluster, metric
from tests.scaleout.conftest import ClusterFactory

PROVIDERS = ["openai", "openai-responses", "anthropic", "gemini"]
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeProviders]:
    async with FakeProviders() as server:
        yield server


@pytest.fixture
async def cluster(make_cluster: ClusterFactory, fake: FakeProviders, session: aiohttp.ClientSession) -> Cluster:
    env = {"OPENAI_API_KEY": TEST_API_KEY, "ANTHROPIC_API_KEY": TEST_API_KEY, "GEMINI_API_KEY": TEST_API_KEY}
    env |= {
        "OPENAI_BASE_URL": fake.base_url("openai"),
        "ANTHROPIC_BASE_URL": fake.base_url("anthropic"),
        "GEMINI_BASE_URL": fake.base_url("gemini"),
    }
    c = await make_cluster(worker_env=env)
    for node in c.nodes:
        await c.wait_ready(node, session)
    return c


@pytest.fixture
async def sdk(cluster: Cluster) -> AsyncIterator[Any]:
    """The SDK's async client (typed Any here: its overloads name OpenAI's own models, not ours). The hub runs
    anonymous here; the SDK needs a key all the same (it would send a hub API key or a JWT)."""
    async with AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="hub-key", max_retries=0) as client:
        yield client


@pytest.mark.e2e
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_sdk_streams_a_tool_call_then_gets_the_answer_on_each_provider(
    sdk: Any, fake: FakeProviders, provider: str
) -> None:
    stream = await sdk.chat.completions.create(
        model=f"{provider}/tool",
        messages=QUESTION,
        tools=[WEATHER],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, ids = "", None, None, set()
    calls: dict[int, dict[str, Any]] = {}
    async for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                entry["name"] += call.function.name or "" if call.function else ""
                entry["arguments"] += call.function.arguments or "" if call.function else ""
            finish = choice.finish_reason or finish
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-gen_")
    assert text == "Checking." and finish == "tool_calls"
    (call,) = calls.values()
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert usage is not None and usage.prompt_tokens == 9

    # The next turn, as the SDK's users write it: the assistant's calls, then each result.
    assistant = {"role": "assistant", "content": text, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
    ]}  # fmt: skip
    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 21}'}
    raw = await sdk.chat.completions.with_raw_response.create(
        model=f"{provider}/tool",
        messages=[*QUESTION, assistant, result],
        tools=[WEATHER],
    )
    completion = raw.parse()
    assert raw.headers["x-generation-id"] == completion.id.removeprefix("chatcmpl-")
    assert completion.choices[0].message.content == "It is sunny."
    assert completion.choices[0].finish_reason == "stop" and completion.usage is not None
    # The provider got the call and its result in its own words.
    assert fake.requests[-1].attempt == 2 and "temp_c" in json.dumps(fake.requests[-1].body)


@pytest.mark.e2e
async def test_the_sdk_raises_its_own_errors_for_what_the_hub_refuses(sdk: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(model="gemini/m", messages=[{"role": "user", "content": "hi"}], n=2)
    assert info.value.code == "unsupported" and "n:" in info.value.message
    bad: Any = [{"role": "wizard", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(model="demo/demo", messages=bad)
    assert info.value.code == "invalid_messages" and "messages[0].role" in info.value.message
    # A failure inside the stream (the provider's error after 200) is the SDK's APIError, not a quiet end.
    stream = await sdk.chat.completions.create(
        model="openai/stream-error", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


@pytest.mark.e2e
async def test_a_background_response_resumes_exactly_on_another_node_when_its_node_is_killed(
    cluster: Cluster, sdk: Any, session: aiohttp.ClientSession
) -> None:
    """OpenAI's background mode, but on any node and for as long as the channel is kept: the SDK's own retrieve
    with starting_after, after the node that served the stream died mid-answer."""
    stream = await sdk.responses.create(model="demo/demo:120", input="hi", stream=True, background=True)
    events: list[Any] = []
    async for event in stream:
        events.append(event)
        if len(events) == 12:
            break  # the connection stays open: it marks the node that serves it
    rid = events[0].response.id
    serving = [n for n in cluster.nodes if await metric(session, n, "hub_connections_open") == 1]
    assert len(serving) == 1
    cluster.kill(serving[0])
    resumed = await sdk.responses.retrieve(rid, stream=True, starting_after=events[-1].sequence_number)
    async for event in resumed:
        events.append(event)
    # Each event once, numbered without a gap, the text whole, ending as the response ended.
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed" and events[-1].response.output_text == text
    assert sum(e.type == "response.output_text.delta" for e in events) == 120  # every token once
    whole = await sdk.responses.retrieve(rid)
    assert whole.status == "completed" and whole.output_text == text
    # The SDK's high-level helper replays from 0 and keeps what it has not seen: the same answer.
    async with sdk.responses.stream(response_id=rid) as helper:
        final = await helper.get_final_response()
    assert final.output_text == text


@pytest.mark.e2e
async def test_a_background_response_is_cancelled_by_the_sdk(cluster: Cluster, sdk: Any) -> None:
    queued = await sdk.responses.create(model="demo/demo:2000", input="hi", background=True)
    assert queued.status == "queued" and queued.id.startswith("resp_")
    await sdk.responses.cancel(queued.id)
    deadline = asyncio.get_running_loop().time() + 20
    while (status := (await sdk.responses.retrieve(queued.id)).status) != "cancelled":
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.1)
