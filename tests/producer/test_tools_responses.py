"""OpenAI Responses API: text, tool calls, reasoning kept across turns as encrypted items, request translation and
failures, against the fake server speaking the real event stream; and a worker running it as a registered provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import orjson
import pytest

from producer.providers.base import Finish, ProviderError, ReasoningDelta, ToolCallDelta, ToolCallEnd
from producer.providers.openai_responses import OpenAIResponsesProvider
from producer.providers.openai_responses import _Decoder as ResponsesDecoder
from producer.settings import ProducerSettings, ProviderKeys, providers_for
from producer.worker import Worker
from ssecore.backend import Entry
from ssecore.backend_memory import MemoryBackend
from ssecore.chat import ChatError
from ssecore.jobs import PROVIDER_NAMES, Job, new_generation_id, parse_job_request
from ssecore.queue_memory import MemoryJobQueue
from ssecore.sse import SSEEvent
from tests.producer.agent_turns import (
    FIRST_TURN,
    PDF,
    PNG,
    SCHEMA,
    TIME,
    WEATHER,
    answer,
    items,
    request,
    tool_result,
)
from tests.producer.fake_providers import DEFAULT_TOKENS, TEST_API_KEY, Behaviour, FakeCall, FakeProviders
from tests.support import settled

KIND: Final = "openai-responses"
REASONING_ITEM = {
    "type": "reasoning",
    "encrypted_content": "sig-fake-1",
    "id": "rs_fake_0",
    "summary": [{"type": "summary_text", "text": "Weather needed."}],
}


def provider(fake: FakeProviders, **config: object) -> OpenAIResponsesProvider:
    return OpenAIResponsesProvider(fake.config(KIND, **config))


async def failure(p: OpenAIResponsesProvider, session: aiohttp.ClientSession, model: str) -> tuple[int, ProviderError]:
    """How many items came before the stream failed, and how it failed."""
    got = 0
    with pytest.raises(ProviderError) as caught:
        async for _ in p.stream(session, request(model, [{"role": "user", "content": "hi"}])):
            got += 1
    return got, caught.value


async def test_text_streams_as_tokens_and_usage_comes_with_the_finish(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    events, message, finish = await answer(provider(fake), session, request("normal", FIRST_TURN))
    assert events == [("token", {"text": t}) for t in DEFAULT_TOKENS]
    assert message == {"role": "assistant", "content": "".join(DEFAULT_TOKENS)}
    assert (finish.finish_reason, finish.input_tokens, finish.output_tokens) == ("stop", 9, 5)
    assert (finish.reasoning_tokens, finish.cached_input_tokens) == (0, 0)
    sent = fake.requests[-1]
    assert sent.path == "/v1/responses" and sent.headers["authorization"] == f"Bearer {TEST_API_KEY}"
    assert sent.body["stream"] is True and sent.body["store"] is False
    # No reasoning asked for: models that do not reason refuse a request for encrypted reasoning.
    assert "include" not in sent.body and "reasoning" not in sent.body


async def test_tool_call_fragments_become_deltas_then_one_whole_call_numbered_from_zero(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    # The call is the server's third output item (reasoning, message, call): it is still call 0.
    events, message, finish = await answer(provider(fake), session, request("tool", FIRST_TURN, tools=[WEATHER]))
    assert finish.finish_reason == "tool_calls"
    assert events == [
        ("reasoning", {"text": "Weather "}),
        ("reasoning", {"text": "needed."}),
        ("token", {"text": "Checking."}),
        ("tool_call_delta", {"index": 0, "id": "call_fake_0", "name": "get_weather", "arguments": ""}),
        ("tool_call_delta", {"index": 0, "arguments": '{"ci'}),
        ("tool_call_delta", {"index": 0, "arguments": 'ty": "Par'}),
        ("tool_call_delta", {"index": 0, "arguments": 'is"}'}),
        ("tool_call", {"index": 0, "id": "call_fake_0", "name": "get_weather", "arguments": '{"city": "Paris"}'}),
    ]
    assert message["tool_calls"] == [
        {"id": "call_fake_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert message["provider_state"] == {KIND: {"reasoning": [REASONING_ITEM]}}


async def test_a_call_after_text_is_call_zero_although_its_output_index_is_one(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    fake.behaviours["text-then-call"] = Behaviour(
        call_text=("Checking.",), tool_calls=(FakeCall("get_time", ('{"zone":', ' "CET"}'), "call_t"),)
    )
    events, _, _ = await answer(provider(fake), session, request("text-then-call", FIRST_TURN, tools=[TIME]))
    assert [d["index"] for name, d in events if name.startswith("tool_call")] == [0, 0, 0, 0]
    assert events[-1] == ("tool_call", {"index": 0, "id": "call_t", "name": "get_time", "arguments": '{"zone": "CET"}'})


async def test_two_calls_keep_their_order_and_the_first_ends_before_the_second_starts(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    events, message, finish = await answer(provider(fake), session, request("tools", FIRST_TURN, tools=[WEATHER, TIME]))
    assert finish.finish_reason == "tool_calls"
    whole = [(i, data) for i, (name, data) in enumerate(events) if name == "tool_call"]
    assert [data for _, data in whole] == [
        {"index": 0, "id": "call_fake_0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"index": 1, "id": "call_fake_1", "name": "get_time", "arguments": '{"zone": "CET"}'},
    ]
    first_of_second = next(i for i, (name, d) in enumerate(events) if name == "tool_call_delta" and d["index"] == 1)
    assert whole[0][0] < first_of_second
    assert [c["id"] for c in message["tool_calls"]] == ["call_fake_0", "call_fake_1"]


async def test_a_reasoning_summary_streams_as_reasoning_and_its_encrypted_item_is_kept(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    req = request("think", [{"role": "user", "content": "hi"}], reasoning_effort="high")
    events, message, finish = await answer(provider(fake), session, req)
    assert events[:2] == [("reasoning", {"text": "Let me "}), ("reasoning", {"text": "think."})]
    assert [name for name, _ in events[2:]] == ["token"] * len(DEFAULT_TOKENS)
    assert message["reasoning"] == "Let me think."
    item = {**REASONING_ITEM, "summary": [{"type": "summary_text", "text": "Let me think."}]}
    assert message["provider_state"] == {KIND: {"reasoning": [item]}}
    assert (finish.reasoning_tokens, finish.output_tokens) == (2, 7)
    body = fake.requests[-1].body
    assert body["reasoning"] == {"effort": "high", "summary": "auto"}
    assert body["include"] == ["reasoning.encrypted_content"] and body["store"] is False


async def test_an_agent_turn_sends_back_reasoning_call_and_result_and_gets_the_answer(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    p = provider(fake)
    _, first, _ = await answer(p, session, request("tool", FIRST_TURN, tools=[WEATHER], reasoning_effort="low"))
    # done.message goes to the client as JSON and comes back as it was.
    first = orjson.loads(orjson.dumps(first))
    second_turn = [*FIRST_TURN, first, *tool_result(first)]
    events, final, finish = await answer(p, session, request("tool", second_turn, tools=[WEATHER]))
    assert finish.finish_reason == "stop" and final == {"role": "assistant", "content": "It is sunny."}
    assert [name for name, _ in events] == ["token", "token"]
    body = fake.requests[-1].body
    assert body["input"][3:] == [
        REASONING_ITEM,
        {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_fake_0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_fake_0", "output": '{"temp_c": 21}'},
    ]
    # The carried reasoning needs its encrypted content back, though this request asks for no reasoning itself.
    assert body["include"] == ["reasoning.encrypted_content"] and "reasoning" not in body


async def test_the_request_speaks_responses_names_for_parts_tools_formats_and_limits(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    weather: dict[str, Any] = orjson.loads(orjson.dumps(WEATHER))
    strict_time: dict[str, Any] = orjson.loads(orjson.dumps(TIME))
    strict_time["function"]["strict"] = True
    req = request(
        "normal",
        FIRST_TURN,
        tools=[WEATHER, strict_time],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        response_format=response_format,
        reasoning_effort="medium",
        max_tokens=300,
        temperature=0.5,
        top_p=0.9,
    )
    await answer(provider(fake), session, req)
    body = fake.requests[-1].body
    assert body["model"] == "normal" and "messages" not in body and "max_tokens" not in body
    assert body["input"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Call tools when you need facts."},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Where is this, and what is the weather there?"},
                {"type": "input_image", "image_url": PNG, "detail": "auto"},
                {"type": "input_file", "file_data": PDF, "filename": "trip.pdf"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": weather["function"]["parameters"],
            "strict": False,  # as in Chat Completions; the Responses API would make it strict
            "description": "The weather in a city",
        },
        {"type": "function", "name": "get_time", "parameters": strict_time["function"]["parameters"], "strict": True},
    ]
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert body["parallel_tool_calls"] is False
    assert body["text"] == {"format": {"type": "json_schema", "name": "weather", "schema": SCHEMA, "strict": True}}
    assert body["reasoning"] == {"effort": "medium", "summary": "auto"}
    assert body["include"] == ["reasoning.encrypted_content"]
    assert (body["max_output_tokens"], body["temperature"], body["top_p"]) == (300, 0.5, 0.9)
    assert body["store"] is False and body["stream"] is True


async def test_json_mode_a_named_choice_and_an_unnamed_file(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    user = {"role": "user", "content": [{"type": "file", "file": {"file_data": PDF}}]}
    req = request("normal", [user], tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    await answer(provider(fake), session, req)
    body = fake.requests[-1].body
    assert body["input"][0]["content"] == [{"type": "input_file", "file_data": PDF, "filename": "file.pdf"}]
    assert body["tool_choice"] == "required" and body["text"] == {"format": {"type": "json_object"}}
    assert "parallel_tool_calls" not in body


@pytest.mark.parametrize(("reason", "expected"), [("length", "length"), ("content_filter", "content_filter")])
async def test_an_incomplete_response_finishes_with_its_reason(
    fake: FakeProviders, session: aiohttp.ClientSession, reason: str, expected: str
) -> None:
    fake.behaviours["short"] = Behaviour(finish_reason=reason)
    stream = await items(provider(fake), session, request("short", [{"role": "user", "content": "hi"}]))
    finish = stream[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == expected and finish.output_tokens == 5


async def test_an_http_429_is_a_retryable_rate_limit(fake: FakeProviders, session: aiohttp.ClientSession) -> None:
    got, err = await failure(provider(fake), session, "rate-limited")
    assert got == 0 and (err.code, err.status, err.retryable, err.after_s) == ("rate_limited", 429, True, 1.0)
    _, quota = await failure(provider(fake), session, "quota")
    assert (quota.code, quota.retryable) == ("quota_exhausted", False)


async def test_a_failed_response_mid_stream_is_an_error(fake: FakeProviders, session: aiohttp.ClientSession) -> None:
    got, err = await failure(provider(fake), session, "stream-error")
    assert got == 2 and err.code == "server_error" and "processing your request" in err.message


@pytest.mark.parametrize("model", ["cut", "end-early"])
async def test_a_stream_without_its_terminal_event_is_truncated(
    fake: FakeProviders, session: aiohttp.ClientSession, model: str
) -> None:
    got, err = await failure(provider(fake), session, model)
    assert got in (2, 3) and (err.code, err.retryable) == ("stream_truncated", True)


async def test_a_malformed_event_is_a_bad_response(fake: FakeProviders, session: aiohttp.ClientSession) -> None:
    _, err = await failure(provider(fake), session, "malformed")
    assert err.code == "bad_response"


@pytest.mark.parametrize(
    ("data", "code", "retryable"),
    [
        ('{"type":"error","code":"rate_limit_exceeded","message":"Slow down","param":null}', "rate_limited", True),
        ('{"type":"error","error":{"type":"server_error","code":null,"message":"Oops"}}', "server_error", True),
        ('{"type":"error","code":"insufficient_quota","message":"Pay","param":null}', "quota_exhausted", False),
        (
            '{"type":"error","code":"context_length_exceeded","message":"Too long","param":"input"}',
            "provider_error",
            False,
        ),
    ],
)
def test_error_events_say_whether_a_retry_can_help(data: str, code: str, retryable: bool) -> None:
    decoder = ResponsesDecoder(TEST_API_KEY)
    with pytest.raises(ProviderError) as caught:
        decoder.feed(SSEEvent(data=data, event="error"))
    assert (caught.value.code, caught.value.retryable) == (code, retryable)


def test_reasoning_summary_parts_are_separated_and_arguments_sent_whole_are_read_at_the_end() -> None:
    decoder = ResponsesDecoder(None)

    def feed(kind: str, **data: Any) -> list[Any]:
        return decoder.feed(SSEEvent(data=orjson.dumps({"type": kind, **data}).decode(), event=kind))

    delta = "response.reasoning_summary_text.delta"
    got = [
        *feed(delta, item_id="rs", output_index=0, summary_index=0, delta="One."),
        *feed(delta, item_id="rs", output_index=0, summary_index=1, delta="Two."),
        # A compatible server that puts the arguments in the item and sends no deltas.
        *feed(
            "response.output_item.added", output_index=1, item={"type": "function_call", "call_id": "c", "name": "f"}
        ),
        *feed("response.output_item.done", output_index=1, item={"type": "function_call", "arguments": '{"a":1}'}),
    ]
    assert got == [
        ReasoningDelta("One."),
        ReasoningDelta("\n\n"),
        ReasoningDelta("Two."),
        ToolCallDelta(0, "", "c", "f"),
        ToolCallDelta(0, '{"a":1}'),
        ToolCallEnd(0),
    ]


# A worker built from its settings, as `python -m producer` builds it.


@pytest.fixture
async def worker_rig(fake: FakeProviders) -> AsyncIterator[tuple[Worker, MemoryBackend, MemoryJobQueue]]:
    settings = ProducerSettings(metrics_port=0, poll_s=0.05, backoff_s=0.05, backoff_max_s=3)
    keys = ProviderKeys(openai_api_key=TEST_API_KEY, openai_base_url=fake.base_url("openai"))
    backend, queue = MemoryBackend(history=1000, ttl_s=3600), MemoryJobQueue()
    worker = Worker(settings, backend=backend, queue=queue, providers=providers_for(settings, keys))
    task = asyncio.create_task(worker.run_async())
    yield worker, backend, queue
    worker.stop()
    await task


async def _run(backend: MemoryBackend, queue: MemoryJobQueue, job: Job) -> list[Entry]:
    await queue.submit(job)
    for _ in range(1000):
        info = await backend.info(job.channel)
        if info is not None and info.closed:
            return (await backend.range(job.channel, "0", limit=1000)).entries
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job.channel} not finished")


def _job(model: str, **fields: Any) -> Job:
    gid = new_generation_id()
    messages = [{"role": "user", "content": "hi"}]
    return Job(id=gid, provider=KIND, model=model, messages=messages, channel=f"gen:{gid}", **fields)


async def test_a_worker_runs_the_provider_with_openai_key_and_url_and_keeps_its_state(
    fake: FakeProviders, worker_rig: tuple[Worker, MemoryBackend, MemoryJobQueue]
) -> None:
    _, backend, queue = worker_rig
    job = _job("think", reasoning_effort="low")
    entries = await _run(backend, queue, job)
    assert [e.event for e in entries] == ["start", "reasoning", "reasoning", *["token"] * 5, "done"]
    done = orjson.loads(entries[-1].data)
    assert done["finish_reason"] == "stop" and done["usage"]["reasoning_tokens"] == 2
    assert done["message"]["provider_state"][KIND]["reasoning"][0]["encrypted_content"] == "sig-fake-1"
    assert fake.requests_for("think")[0].headers["authorization"] == f"Bearer {TEST_API_KEY}"
    record = await settled(queue, job.id)
    assert record.status == "done" and record.message == done["message"]


async def test_a_worker_ends_a_response_failed_mid_stream_with_an_error_not_a_done(
    worker_rig: tuple[Worker, MemoryBackend, MemoryJobQueue],
) -> None:
    _, backend, queue = worker_rig
    entries = await _run(backend, queue, _job("stream-error"))
    assert [e.event for e in entries] == ["start", "token", "token", "error"]
    assert orjson.loads(entries[-1].data)["code"] == "server_error"


def test_jobs_may_name_the_provider_and_what_it_cannot_do_is_refused() -> None:
    providers = {name: name for name in PROVIDER_NAMES}  # as the hub builds its map
    body: dict[str, Any] = {"provider": KIND, "model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
    job = parse_job_request(body, providers=providers, generation_id="gen_1", channel_ok=lambda _: True)
    assert job.provider == KIND
    with pytest.raises(ChatError, match="params.stop"):
        parse_job_request(
            {**body, "params": {"stop": ["\n"]}}, providers=providers, generation_id="gen_2", channel_ok=lambda _: True
        )


def test_kept_reasoning_keeps_only_its_summary_text() -> None:
    """The state comes back from the client: only what a reasoning item holds goes on to the API."""
    from producer.providers.openai_responses import _kept_reasoning

    item = {
        "type": "reasoning",
        "id": "rs_1",
        "encrypted_content": "enc",
        "summary": [{"type": "summary_text", "text": "Plan.", "extra": 1}, {"type": "other"}, "x", {"text": 5}],
        "status": "completed",
    }
    assert _kept_reasoning(item) == {
        "type": "reasoning",
        "encrypted_content": "enc",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "Plan."}],
    }
