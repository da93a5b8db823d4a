"""`POST /v1/chat/completions` on a hub with its embedded worker: OpenAI's request in, OpenAI's answer out, a
generation behind each (the same record and channel), and OpenAI's error shape. The official SDK itself is run
against three nodes behind nginx in tests/scaleout/test_openai_sdk.py."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from hub.appkeys import JOBS
from producer.settings import ProducerSettings
from ssecore.backend_memory import MemoryBackend
from tests.conftest import ClientFactory
from tests.producer.agent_turns import WEATHER
from tests.producer.fake_providers import FakeProviders

Client = TestClient[Any, Any]
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def hub(fake_hub: Client) -> Client:
    return fake_hub


async def post(hub: Client, body: dict[str, Any], status: int = 200) -> tuple[Any, dict[str, str]]:
    resp = await hub.post("/v1/chat/completions", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    raw = await resp.read()
    assert resp.status == status, raw
    if resp.content_type == "text/event-stream":
        datas = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        return [d if d == "[DONE]" else orjson.loads(d) for d in datas], dict(resp.headers)
    return orjson.loads(raw), dict(resp.headers)


async def test_a_whole_completion_is_the_generations_message_and_its_record(hub: Client) -> None:
    body, headers = await post(hub, {"model": "demo/demo:3", "messages": HI})
    gid = headers["X-Generation-Id"]
    assert body["id"] == f"chatcmpl-{gid}" and body["object"] == "chat.completion" and body["model"] == "demo/demo:3"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    record = await (await hub.get(f"/v1/generations/{gid}")).json()
    assert record["status"] == "done" and record["message"]["content"] == choice["message"]["content"]


async def test_a_bare_model_is_the_default_providers_and_chunks_carry_tool_call_fragments(
    hub: Client, fake: FakeProviders
) -> None:
    chunks, _ = await post(
        hub,
        {
            "model": "tool",
            "messages": HI,
            "tools": [WEATHER],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert fake.requests[-1].provider == "openai" and fake.requests[-1].model == "tool"  # --default-provider
    *objects, done = chunks
    assert done == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in objects if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Weather needed."
    fragments = [f for d in deltas for f in d.get("tool_calls", [])]
    assert fragments[0] == {"index": 0, "id": "call_fake_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"ci'}}  # fmt: skip
    assert "".join(f["function"]["arguments"] for f in fragments) == '{"city": "Paris"}'
    assert [c["choices"][0]["finish_reason"] for c in objects if c["choices"]][-1] == "tool_calls"
    assert objects[-1]["choices"] == [] and objects[-1]["usage"]["prompt_tokens"] == 9


async def test_an_assistant_message_the_sdk_returned_goes_back_as_it_is(hub: Client, fake: FakeProviders) -> None:
    first, _ = await post(hub, {"model": "openai/tool", "messages": HI, "tools": [WEATHER]})
    said = first["choices"][0]["message"]
    assert said["reasoning_content"] == "Weather needed." and said["refusal"] is None
    # What the SDK's message model dumps: its own null fields beside ours.
    returned = {**said, "annotations": None, "audio": None, "function_call": None}
    result = {"role": "tool", "tool_call_id": said["tool_calls"][0]["id"], "content": "sunny"}
    second, _ = await post(hub, {"model": "openai/tool", "messages": [*HI, returned, result], "tools": [WEATHER]})
    assert second["choices"][0]["message"]["content"] == "It is sunny."
    sent = fake.requests[-1].body["messages"][1]
    assert sent == {"role": "assistant", "content": "Checking.", "tool_calls": said["tool_calls"]}


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"model": "demo/demo", "messages": HI, "n": 2}, 400, "unsupported", "n:"),
        ({"model": "demo/demo", "messages": HI, "logprobs": True}, 400, "unsupported", "logprobs"),
        ({"model": "demo/demo", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_messages", "role"),
        ({"model": "", "messages": HI}, 400, "invalid_model", "model"),
        ({"model": "openai/server-error", "messages": HI}, 502, "server_error", "HTTP 500"),
    ],
)
async def test_errors_take_openais_shape(hub: Client, body: dict[str, Any], status: int, code: str, words: str) -> None:
    answer, _ = await post(hub, body, status)
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and words in error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")


async def test_a_failure_inside_the_stream_is_an_error_chunk_not_a_quiet_end(hub: Client) -> None:
    chunks, _ = await post(hub, {"model": "openai/stream-error", "messages": HI, "stream": True})
    assert "[DONE]" not in chunks and chunks[-1]["error"]["code"] == "server_error"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c.get("choices")) == "Hello,"


async def test_the_stream_helpers_message_goes_back_too(hub: Client) -> None:
    """The SDK's `chat.completions.stream()` helper adds `index` and `parsed_arguments` to the calls it returns."""
    first, _ = await post(hub, {"model": "openai/tool", "messages": HI, "tools": [WEATHER]})
    said = first["choices"][0]["message"]
    helper = {**said, "tool_calls": [{**c, "index": 0, "function": {**c["function"], "parsed_arguments": None}}
                                     for c in said["tool_calls"]]}  # fmt: skip
    result = {"role": "tool", "tool_call_id": said["tool_calls"][0]["id"], "content": "sunny"}
    second, _ = await post(hub, {"model": "openai/tool", "messages": [*HI, helper, result], "tools": [WEATHER]})
    assert second["choices"][0]["message"]["content"] == "It is sunny."


async def test_a_request_refused_after_its_generation_was_queued_leaves_none_running(
    make_client: ClientFactory,
) -> None:
    """An SDK retries a 429: each retry must not leave a generation behind for nobody."""
    hub = await make_client(
        MemoryBackend(history=10_000, ttl_s=3600),
        worker_settings=ProducerSettings(metrics_port=0, poll_s=0.05, demo_tokens_per_s=20),
        max_streams_per_client=1,
    )
    held = await hub.get("/v1/channels/busy/events")  # the client's one stream
    try:
        answer, _ = await post(hub, {"model": "demo/demo:200", "messages": HI}, 429)
    finally:
        held.close()
    assert answer["error"]["type"] == "rate_limit_error"
    jobs = hub.app[JOBS]
    for _ in range(100):
        records = [await jobs.get(g) for g in list(jobs._records)]
        if all(r is not None and r.status == "cancelled" for r in records):
            break
        await asyncio.sleep(0.05)
    assert [r.status for r in records if r is not None] == ["cancelled"]
