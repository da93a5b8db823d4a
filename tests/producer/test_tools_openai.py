"""OpenAI Chat Completions (and compatible servers): tool calls, reasoning, JSON output and an agent turn, against
the fake server speaking the real wire format, checking what it is sent."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from producer.providers.base import ProviderError, ToolCallDelta, ToolCallEnd
from producer.providers.openai import OpenAIProvider
from producer.providers.openai import _Decoder as OpenAIDecoder
from ssecore.sse import SSEEvent
from tests.producer.agent_turns import FIRST_TURN, SCHEMA, TIME, WEATHER, answer, request, tool_result
from tests.producer.fake_providers import FakeProviders


def provider(fake: FakeProviders, **config: object) -> OpenAIProvider:
    return OpenAIProvider(fake.config("openai", **config))


async def test_tool_call_fragments_become_deltas_then_one_whole_call(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    events, message, finish = await answer(provider(fake), session, request("tool", FIRST_TURN, tools=[WEATHER]))
    assert finish.finish_reason == "tool_calls"
    assert events == [
        ("reasoning", {"text": "Weather "}),
        ("reasoning", {"text": "needed."}),
        ("token", {"text": "Checking."}),
        ("tool_call_delta", {"index": 0, "id": "call_fake_0", "name": "get_weather", "arguments": '{"ci'}),
        ("tool_call_delta", {"index": 0, "arguments": 'ty": "Par'}),
        ("tool_call_delta", {"index": 0, "arguments": 'is"}'}),
        ("tool_call", {"index": 0, "id": "call_fake_0", "name": "get_weather", "arguments": '{"city": "Paris"}'}),
    ]
    assert message == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "call_fake_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
        "reasoning": "Weather needed.",
    }


async def test_several_calls_at_once_keep_their_order(fake: FakeProviders, session: aiohttp.ClientSession) -> None:
    events, message, _ = await answer(provider(fake), session, request("tools", FIRST_TURN, tools=[WEATHER, TIME]))
    whole = [data for name, data in events if name == "tool_call"]
    assert whole == [
        {"index": 0, "id": "call_fake_0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"index": 1, "id": "call_fake_1", "name": "get_time", "arguments": '{"zone": "CET"}'},
    ]
    # The first call is complete as soon as the second begins.
    names = [name for name, _ in events]
    assert names.index("tool_call") < max(i for i, n in enumerate(names) if n == "tool_call_delta")
    assert [c["id"] for c in message["tool_calls"]] == ["call_fake_0", "call_fake_1"]


def test_a_server_that_numbers_every_call_zero_still_gets_two_calls() -> None:
    """Some compatible servers send index 0 for each call; a new id is a new call."""
    decoder = OpenAIDecoder(None)

    def chunk(fragment: str) -> SSEEvent:
        return SSEEvent(data='{"choices":[{"index":0,"delta":{"tool_calls":[' + fragment + "]}}]}")

    items = [
        *decoder.feed(chunk('{"index":0,"id":"a","function":{"name":"f","arguments":"{}"}}')),
        *decoder.feed(chunk('{"index":0,"id":"b","function":{"name":"g","arguments":"{\\"x\\""}}')),
        *decoder.feed(chunk('{"index":0,"function":{"arguments":":1}"}}')),
    ]
    assert items == [
        ToolCallDelta(0, "{}", "a", "f"),
        ToolCallEnd(0),
        ToolCallDelta(1, '{"x"', "b", "g"),
        ToolCallDelta(1, ":1}"),
    ]


async def test_the_request_carries_parts_tools_json_mode_and_effort_in_openai_names(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    req = request(
        "normal",
        FIRST_TURN,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        response_format=response_format,
        reasoning_effort="low",
        max_tokens=300,
    )
    await answer(provider(fake), session, req)
    body = fake.requests[-1].body
    # developer becomes system: compatible servers know only that; the API reads it the same way.
    assert body["messages"] == [FIRST_TURN[0], {"role": "system", "content": FIRST_TURN[1]["content"]}, FIRST_TURN[2]]
    assert body["tools"] == [WEATHER] and body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert body["response_format"] == response_format and body["reasoning_effort"] == "low"
    assert body["max_completion_tokens"] == 300 and "max_tokens" not in body


async def test_an_agent_turn_sends_back_the_call_and_its_result_and_gets_the_answer(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    p = provider(fake)
    _, first, _ = await answer(p, session, request("tool", FIRST_TURN, tools=[WEATHER]))
    second_turn = [*FIRST_TURN, first, *tool_result(first)]
    events, final, finish = await answer(p, session, request("tool", second_turn, tools=[WEATHER]))
    assert finish.finish_reason == "stop" and final["content"] == "It is sunny." and "tool_calls" not in final
    sent = fake.requests[-1].body["messages"]
    # The assistant message goes back as the API knows it: reasoning is ours, not a field the API takes.
    assert sent[3] == {"role": "assistant", "content": "Checking.", "tool_calls": first["tool_calls"]}
    assert sent[4] == {"role": "tool", "tool_call_id": "call_fake_0", "content": '{"temp_c": 21}'}


async def test_usage_reports_reasoning_and_cached_tokens() -> None:
    decoder = OpenAIDecoder(None)
    usage = (
        '{"choices":[],"usage":{"prompt_tokens":50,"completion_tokens":30,'
        '"prompt_tokens_details":{"cached_tokens":40},"completion_tokens_details":{"reasoning_tokens":20}}}'
    )
    decoder.feed(SSEEvent(data='{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'))
    decoder.feed(SSEEvent(data=usage))
    (finish,) = decoder.feed(SSEEvent(data="[DONE]"))
    assert (finish.input_tokens, finish.output_tokens) == (50, 30)  # type: ignore[union-attr]
    assert (finish.reasoning_tokens, finish.cached_input_tokens) == (20, 40)  # type: ignore[union-attr]


async def test_what_the_api_requires_is_filled_in_and_what_it_refuses_left_out(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    file_part = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQK"}}
    call = {"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}  # no "type"
    turn: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Read this."}, file_part]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    await answer(provider(fake), session, request("normal", turn, tool_choice="auto"))
    body = fake.requests[-1].body
    assert body["messages"][0]["content"][1]["file"]["filename"] == "file.pdf"
    assert body["messages"][1]["tool_calls"][0]["type"] == "function"
    assert "tool_choice" not in body  # the API refuses it without tools


def test_odd_error_codes_and_arguments_sent_as_objects_are_read_not_a_crash() -> None:
    with pytest.raises(ProviderError) as info:
        OpenAIDecoder(None).feed(SSEEvent(data='{"error": {"message": "x", "code": ["a"], "type": {"b": 1}}}'))
    assert info.value.code == "provider_error"
    items = OpenAIDecoder(None).feed(
        SSEEvent(
            data='{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f","arguments":{"x":1}}}]}}]}'
        )
    )
    assert items == [ToolCallDelta(0, '{"x":1}', "a", "f")]
