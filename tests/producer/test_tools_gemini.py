"""Gemini: function calls, thoughts and their signatures, JSON output and an agent turn, against the fake server
speaking the real streamGenerateContent format, checking what it is sent."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson
import pytest

from producer.providers.base import Finish, ProviderError, ToolCallDelta, ToolCallEnd
from producer.providers.gemini import GeminiProvider
from producer.providers.gemini import _Decoder as GeminiDecoder
from ssecore.sse import SSEEvent
from tests.producer.agent_turns import FIRST_TURN, PDF, SCHEMA, TIME, WEATHER, answer, items, request, tool_result
from tests.producer.fake_providers import FakeProviders

CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def provider(fake: FakeProviders) -> GeminiProvider:
    return GeminiProvider(fake.config("gemini"))


def chunk(parts: list[dict[str, Any]], **candidate: Any) -> SSEEvent:
    return SSEEvent(
        orjson.dumps({"candidates": [{"content": {"parts": parts, "role": "model"}, **candidate}]}).decode()
    )


async def test_a_call_comes_whole_as_one_delta_with_a_made_up_id_then_the_tool_call(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    events, message, finish = await answer(provider(fake), session, request("tool", FIRST_TURN, tools=[WEATHER]))
    # Gemini says STOP for an answer that calls functions.
    assert finish.finish_reason == "tool_calls"
    call_id = message["tool_calls"][0]["id"]
    assert CALL_ID.match(call_id)
    call = {"index": 0, "id": call_id, "name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert events == [
        ("reasoning", {"text": "Weather "}),
        ("reasoning", {"text": "needed."}),
        ("token", {"text": "Checking."}),
        ("tool_call_delta", call),
        ("tool_call", call),
    ]
    assert message == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
        "reasoning": "Weather needed.",
        # The signature came on the call's part: it is kept by the call it belongs to.
        "provider_state": {"gemini": {"call_signatures": {call_id: "sig-fake-1"}}},
    }


async def test_calls_in_separate_chunks_are_numbered_in_order_with_ids_of_their_own(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    events, message, _ = await answer(provider(fake), session, request("tools", FIRST_TURN, tools=[WEATHER, TIME]))
    whole = [data for name, data in events if name == "tool_call"]
    assert [(c["index"], c["name"], c["arguments"]) for c in whole] == [
        (0, "get_weather", '{"city":"Paris"}'),
        (1, "get_time", '{"zone":"CET"}'),
    ]
    ids = [c["id"] for c in whole]
    assert all(CALL_ID.match(i) for i in ids) and ids[0] != ids[1]
    assert [c["id"] for c in message["tool_calls"]] == ids
    assert "provider_state" not in message  # no thinking, no signatures


async def test_thoughts_are_reasoning_and_the_text_signature_goes_back_on_the_text(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    p = provider(fake)
    events, message, finish = await answer(p, session, request("think", FIRST_TURN))
    assert events[:2] == [("reasoning", {"text": "Let me "}), ("reasoning", {"text": "think."})]
    assert message["content"] == "Hello, world!" and message["reasoning"] == "Let me think."
    # The signature came alone, on an empty text part at the end of the stream.
    assert message["provider_state"] == {"gemini": {"text_signature": "sig-fake-1"}}
    assert (finish.output_tokens, finish.reasoning_tokens) == (7, 2)  # thoughts are output tokens too
    await answer(p, session, request("normal", [*FIRST_TURN, message, {"role": "user", "content": "And then?"}]))
    # Thoughts are not sent back; the signature is, on the part it came with.
    model = fake.requests[-1].body["contents"][1]
    assert model == {"role": "model", "parts": [{"text": "Hello, world!", "thoughtSignature": "sig-fake-1"}]}


async def test_an_agent_turn_sends_back_the_signed_call_and_its_named_result_and_gets_the_answer(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    p = provider(fake)
    _, first, _ = await answer(p, session, request("tool", FIRST_TURN, tools=[WEATHER]))
    second_turn = [*FIRST_TURN, first, *tool_result(first)]
    events, final, finish = await answer(p, session, request("tool", second_turn, tools=[WEATHER]))
    assert finish.finish_reason == "stop" and final["content"] == "It is sunny." and "tool_calls" not in final
    contents = fake.requests[-1].body["contents"]
    assert contents[1] == {
        "role": "model",
        "parts": [
            {"text": "Checking."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "sig-fake-1"},
        ],
    }
    # Gemini knows a result by its function's name; a JSON object result goes as the response itself.
    assert contents[2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}],
    }
    assert len(contents) == 3


async def test_the_results_of_several_calls_go_back_as_one_content_and_text_results_are_wrapped(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    p = provider(fake)
    _, first, _ = await answer(p, session, request("tools", FIRST_TURN, tools=[WEATHER, TIME]))
    weather, time = first["tool_calls"]
    results = [
        {"role": "tool", "tool_call_id": weather["id"], "content": '{"temp_c": 21}'},
        {"role": "tool", "tool_call_id": time["id"], "content": "14:05"},
    ]
    _, final, _ = await answer(p, session, request("tools", [*FIRST_TURN, first, *results], tools=[WEATHER, TIME]))
    assert final["content"] == "Both done."
    contents = fake.requests[-1].body["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    assert contents[2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}},
        {"functionResponse": {"name": "get_time", "response": {"result": "14:05"}}},
    ]


async def test_the_request_carries_parts_tools_json_schema_and_thinking_in_gemini_names(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    req = request(
        "normal",
        FIRST_TURN,
        tools=[WEATHER, TIME],
        tool_choice="required",
        response_format=response_format,
        reasoning_effort="low",
        max_tokens=300,
    )
    await answer(provider(fake), session, req)
    body = fake.requests[-1].body
    # system and developer messages both instruct the model.
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Call tools when you need facts."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "Where is this, and what is the weather there?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"inlineData": {"mimeType": "application/pdf", "data": PDF.partition(",")[2]}},
            ],
        }
    ]
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parametersJsonSchema": WEATHER["function"]["parameters"],  # type: ignore[index]
                },
                {"name": "get_time", "parametersJsonSchema": TIME["function"]["parameters"]},  # type: ignore[index]
            ]
        }
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json" and config["responseJsonSchema"] == SCHEMA
    assert config["thinkingConfig"]["includeThoughts"] is True and config["maxOutputTokens"] == 300


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"mode": "ANY", "allowedFunctionNames": ["get_time"]}),
    ],
)
async def test_each_tool_choice_becomes_a_function_calling_mode(
    fake: FakeProviders, session: aiohttp.ClientSession, choice: Any, expected: dict[str, Any]
) -> None:
    await answer(provider(fake), session, request("normal", FIRST_TURN, tools=[WEATHER, TIME], tool_choice=choice))
    assert fake.requests[-1].body["toolConfig"] == {"functionCallingConfig": expected}


async def test_json_object_asks_for_json_without_a_schema_and_more_effort_buys_more_thinking(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    budgets = []
    for effort in ("low", "medium", "high"):
        req = request("normal", FIRST_TURN, response_format={"type": "json_object"}, reasoning_effort=effort)
        await answer(provider(fake), session, req)
        config = fake.requests[-1].body["generationConfig"]
        assert config["responseMimeType"] == "application/json" and "responseJsonSchema" not in config
        assert config["thinkingConfig"]["includeThoughts"] is True
        budgets.append(config["thinkingConfig"]["thinkingBudget"])
    assert 0 < budgets[0] < budgets[1] < budgets[2]
    assert "tools" not in fake.requests[-1].body and "toolConfig" not in fake.requests[-1].body


async def test_call_arguments_that_are_not_a_json_object_are_refused_before_sending(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}
    turn = [*FIRST_TURN, {"role": "assistant", "content": None, "tool_calls": [call]}]
    turn.append({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
    with pytest.raises(ProviderError) as info:
        await items(provider(fake), session, request("normal", turn, tools=[WEATHER]))
    assert info.value.code == "bad_request" and "messages[3].tool_calls[0].function.arguments" in info.value.message
    assert fake.requests == []


def test_calls_in_one_chunk_keep_each_signature_by_their_own_call() -> None:
    decoder = GeminiDecoder(None)
    first = decoder.feed(chunk([{"functionCall": {"name": "f", "args": {"a": 1}}}]))
    second = decoder.feed(
        chunk(
            [
                {"functionCall": {"name": "g"}, "thoughtSignature": "sig-g"},
                {"functionCall": {"name": "h", "args": {}, "id": "given-1"}},
            ],
            finishReason="STOP",
        )
    )
    finish = decoder.end(None)
    (f_delta, f_end), (g_delta, g_end, h_delta, h_end) = first, second
    assert isinstance(f_delta, ToolCallDelta) and isinstance(g_delta, ToolCallDelta)
    assert (f_delta.index, f_delta.arguments, f_delta.name, f_end) == (0, '{"a":1}', "f", ToolCallEnd(0))
    assert (g_delta.index, g_delta.arguments, g_delta.name, g_end) == (1, "{}", "g", ToolCallEnd(1))
    assert h_delta == ToolCallDelta(2, "{}", "given-1", "h") and h_end == ToolCallEnd(2)  # an id Gemini gives is kept
    assert finish.finish_reason == "tool_calls"
    assert finish.provider_state == {"call_signatures": {g_delta.id: "sig-g"}}


def test_usage_reports_thinking_and_cached_tokens() -> None:
    decoder = GeminiDecoder(None)
    usage = {
        "promptTokenCount": 50,
        "cachedContentTokenCount": 40,
        "candidatesTokenCount": 10,
        "thoughtsTokenCount": 20,
    }
    event = SSEEvent(
        orjson.dumps(
            {"candidates": [{"content": {"parts": [{"text": "ok"}]}, "finishReason": "STOP"}], "usageMetadata": usage}
        ).decode()
    )
    *_, finish = decoder.feed(event)
    assert finish == Finish("stop", 50, 30, reasoning_tokens=20, cached_input_tokens=40)
