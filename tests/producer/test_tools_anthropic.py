"""Anthropic Messages: tool calls, thinking and its signatures, JSON output and an agent turn, against the fake server
speaking the real wire format, checking what it is sent."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from producer.providers.anthropic import DEFAULT_MAX_TOKENS, AnthropicProvider
from producer.providers.anthropic import _Decoder as AnthropicDecoder
from producer.providers.base import Finish, ProviderError, ReasoningDelta, StreamItem, ToolCallDelta, ToolCallEnd
from ssecore.jobs import JobRequestError, parse_job_request
from ssecore.sse import SSEEvent
from tests.producer.agent_turns import FIRST_TURN, PDF, PNG, SCHEMA, TIME, WEATHER, answer, request, tool_result
from tests.producer.fake_providers import FakeProviders

THOUGHT = {"type": "thinking", "thinking": "Weather needed.", "signature": "sig-fake-1"}


def provider(fake: FakeProviders) -> AnthropicProvider:
    return AnthropicProvider(fake.config("anthropic"))


async def sent(fake: FakeProviders, session: aiohttp.ClientSession, **fields: Any) -> dict[str, Any]:
    """The body the API is sent for a first turn with these request fields."""
    await answer(provider(fake), session, request("normal", FIRST_TURN, **fields))
    body: dict[str, Any] = fake.requests[-1].body
    return body


async def test_tool_call_fragments_become_deltas_then_one_whole_call(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    events, message, finish = await answer(provider(fake), session, request("tool", FIRST_TURN, tools=[WEATHER]))
    assert finish.finish_reason == "tool_calls"
    # The call is block 2 of the answer (after thinking and text) and the first call: index 0.
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
        "provider_state": {"anthropic": {"thinking": [THOUGHT]}},
    }


async def test_several_calls_at_once_keep_their_order(fake: FakeProviders, session: aiohttp.ClientSession) -> None:
    events, message, _ = await answer(provider(fake), session, request("tools", FIRST_TURN, tools=[WEATHER, TIME]))
    whole = [data for name, data in events if name == "tool_call"]
    assert whole == [
        {"index": 0, "id": "call_fake_0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"index": 1, "id": "call_fake_1", "name": "get_time", "arguments": '{"zone": "CET"}'},
    ]
    # Each call is complete at the end of its block, before the next one begins.
    names = [name for name, _ in events]
    second = next(i for i, (name, data) in enumerate(events) if name == "tool_call_delta" and data["index"] == 1)
    assert names.index("tool_call") < second
    assert [c["id"] for c in message["tool_calls"]] == ["call_fake_0", "call_fake_1"]
    assert "provider_state" not in message  # no thinking, nothing to keep


async def test_thinking_is_reasoning_and_its_signed_block_is_the_provider_state(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    events, message, finish = await answer(provider(fake), session, request("think", FIRST_TURN))
    assert [e for e in events if e[0] == "reasoning"] == [
        ("reasoning", {"text": "Let me "}),
        ("reasoning", {"text": "think."}),
    ]
    assert message["content"] == "Hello, world!" and message["reasoning"] == "Let me think."
    state = {"thinking": [{"type": "thinking", "thinking": "Let me think.", "signature": "sig-fake-1"}]}
    assert finish.provider_state == state and message["provider_state"] == {"anthropic": state}


async def test_an_agent_turn_sends_back_thinking_text_and_call_then_the_result(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    p = provider(fake)
    _, first, _ = await answer(p, session, request("tool", FIRST_TURN, tools=[WEATHER]))
    second_turn = [*FIRST_TURN, first, *tool_result(first)]
    _, final, finish = await answer(p, session, request("tool", second_turn, tools=[WEATHER]))
    assert finish.finish_reason == "stop" and final["content"] == "It is sunny." and "tool_calls" not in final
    messages = fake.requests[-1].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    # The signed thinking block first, as it came (the API checks the signature), then the text, then the call.
    assert messages[1] == {
        "role": "assistant",
        "content": [
            THOUGHT,
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_fake_0", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }
    assert messages[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "call_fake_0", "content": '{"temp_c": 21}'}],
    }


async def test_results_of_several_calls_go_back_in_one_user_message(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    p = provider(fake)
    _, first, _ = await answer(p, session, request("tools", FIRST_TURN, tools=[WEATHER, TIME]))
    follow_up = {"role": "user", "content": "And tomorrow?"}
    turn = [*FIRST_TURN, first, *tool_result(first), follow_up]
    await answer(p, session, request("tools", turn, tools=[WEATHER, TIME]))
    messages = fake.requests[-1].body["messages"]
    # Roles must alternate: the two results and the user's next words are one user message, results first.
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_fake_0", "content": '{"temp_c": 21}'},
        {"type": "tool_result", "tool_use_id": "call_fake_1", "content": '{"temp_c": 21}'},
        {"type": "text", "text": "And tomorrow?"},
    ]
    # An assistant message without text has no empty text block (the API refuses those).
    assert [b["type"] for b in messages[1]["content"]] == ["tool_use", "tool_use"]


async def test_system_and_developer_text_images_and_pdfs_become_anthropic_blocks(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    link = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}
    await answer(provider(fake), session, request("normal", [*FIRST_TURN, {"role": "assistant", "content": "?"}, link]))
    body = fake.requests[-1].body
    assert body["system"] == "Be brief.\n\nCall tools when you need facts."
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Where is this, and what is the weather there?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG.split(",")[1]}},
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": PDF.split(",")[1]},
                    "title": "trip.pdf",
                },
            ],
        },
        {"role": "assistant", "content": "?"},
        {
            "role": "user",
            "content": [{"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}],
        },
    ]


async def test_tools_json_schema_output_and_thinking_in_anthropic_names(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    body = await sent(fake, session, tools=[WEATHER, TIME], response_format=response_format, reasoning_effort="medium")
    assert body["tools"] == [
        {
            "name": "get_weather",
            "input_schema": WEATHER["function"]["parameters"],  # type: ignore[index]
            "description": "The weather in a city",
        },
        {"name": "get_time", "input_schema": TIME["function"]["parameters"]},  # type: ignore[index]
    ]
    assert "tool_choice" not in body  # the API's default is auto
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    # The thinking counts toward max_tokens: the default answer comes on top of the budget.
    assert body["max_tokens"] == 4096 + DEFAULT_MAX_TOKENS
    assert "response_format" not in body and "reasoning_effort" not in body


@pytest.mark.parametrize(
    ("effort", "max_tokens", "budget", "expected"),
    [
        ("low", None, 1024, 1024 + DEFAULT_MAX_TOKENS),
        ("high", None, 16384, 16384 + DEFAULT_MAX_TOKENS),
        ("low", 2000, 1024, 2000),
    ],
)
async def test_thinking_budget_and_max_tokens(
    fake: FakeProviders,
    session: aiohttp.ClientSession,
    effort: str,
    max_tokens: int | None,
    budget: int,
    expected: int,
) -> None:
    body = await sent(fake, session, reasoning_effort=effort, max_tokens=max_tokens)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": budget} and body["max_tokens"] == expected


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "get_time"}}, None, {"type": "tool", "name": "get_time"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            False,
            {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        ),
    ],
)
async def test_tool_choice_and_parallel_calls_in_anthropic_names(
    fake: FakeProviders,
    session: aiohttp.ClientSession,
    tool_choice: Any,
    parallel: bool | None,
    expected: dict[str, Any],
) -> None:
    body = await sent(fake, session, tools=[WEATHER, TIME], tool_choice=tool_choice, parallel_tool_calls=parallel)
    assert body["tool_choice"] == expected and "parallel_tool_calls" not in body


async def test_a_call_whose_arguments_are_not_a_json_object_is_refused_naming_it(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Par'}}
    turn = [
        *FIRST_TURN,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        *tool_result({"tool_calls": [call]}),
    ]
    with pytest.raises(ProviderError) as info:
        await answer(provider(fake), session, request("normal", turn, tools=[WEATHER]))
    assert info.value.code == "bad_request" and not info.value.retryable
    assert "messages[3].tool_calls[0].function.arguments" in info.value.message
    assert fake.requests == []  # never sent


def feed(decoder: AnthropicDecoder, *events: tuple[str, str]) -> list[StreamItem]:
    return [item for name, data in events for item in decoder.feed(SSEEvent(data, name))]


def test_redacted_thinking_is_kept_whole_in_order_and_shows_nothing() -> None:
    decoder = AnthropicDecoder(None)
    redacted = '{"type":"content_block_start","index":0,"content_block":{"type":"redacted_thinking","data":"EmwK"}}'
    thinking = '{"type":"content_block_start","index":1,"content_block":{"type":"thinking","thinking":""}}'
    items = feed(
        decoder,
        ("content_block_start", redacted),
        ("content_block_stop", '{"type":"content_block_stop","index":0}'),
        ("content_block_start", thinking),
        ("content_block_delta", '{"index":1,"delta":{"type":"thinking_delta","thinking":"Hm."}}'),
        ("content_block_delta", '{"index":1,"delta":{"type":"signature_delta","signature":"EqQB"}}'),
        ("content_block_stop", '{"type":"content_block_stop","index":1}'),
        ("message_delta", '{"type":"message_delta","delta":{"stop_reason":"end_turn"}}'),
        ("message_stop", '{"type":"message_stop"}'),
    )
    state = {
        "thinking": [
            {"type": "redacted_thinking", "data": "EmwK"},
            {"type": "thinking", "thinking": "Hm.", "signature": "EqQB"},
        ]
    }
    assert items == [ReasoningDelta("Hm."), Finish("stop", provider_state=state)]


def test_a_call_given_whole_at_its_start_and_cached_prompt_tokens() -> None:
    decoder = AnthropicDecoder(None)
    usage = '{"input_tokens":5,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":1}'
    start = '{"index":3,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{"x":1}}}'
    items = feed(
        decoder,
        ("message_start", '{"type":"message_start","message":{"usage":' + usage + "}}"),
        ("content_block_start", start),
        ("content_block_stop", '{"index":3}'),
        ("message_delta", '{"delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":7}}'),
        ("message_stop", "{}"),
    )
    assert items == [
        ToolCallDelta(0, '{"x":1}', "toolu_1", "f"),
        ToolCallEnd(0),
        Finish("tool_calls", input_tokens=1105, output_tokens=7, cached_input_tokens=1000),
    ]


def job(**fields: Any) -> None:
    body = {"provider": "claude", "model": "m", "messages": FIRST_TURN, **fields}
    parse_job_request(body, providers={"claude": "anthropic"}, generation_id="gen_x", channel_ok=lambda _name: True)


def test_the_hub_refuses_max_tokens_not_above_the_thinking_budget() -> None:
    with pytest.raises(JobRequestError) as info:
        job(reasoning_effort="medium", params={"max_tokens": 4096})
    assert info.value.code == "unsupported"
    assert info.value.message.startswith("params.max_tokens: provider claude "), info.value.message
    job(reasoning_effort="medium", params={"max_tokens": 4097})
    job(params={"max_tokens": 10})  # without thinking, any max_tokens


async def test_the_default_output_cap_is_a_setting_and_thinking_comes_on_top(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    """The API requires max_tokens: a request that sets none gets --anthropic-max-tokens (plus the thinking budget)."""
    from producer.settings import ProducerSettings, ProviderKeys, providers_for

    settings = ProducerSettings.from_args(["--anthropic-max-tokens", "2048"], {})
    keys = ProviderKeys(anthropic_api_key="k", anthropic_base_url=fake.base_url("anthropic"))
    capped = providers_for(settings, keys)["anthropic"]
    await answer(capped, session, request("normal", FIRST_TURN))
    await answer(capped, session, request("normal", FIRST_TURN, reasoning_effort="low"))
    assert [r.body["max_tokens"] for r in fake.requests] == [2048, 2048 + 1024]


async def test_thinking_state_from_the_client_is_checked_not_trusted(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    """provider_state comes back from the client: a mangled one is left out, not a crash, and it cannot carry fields
    of its own into the request."""
    signed = {"type": "thinking", "thinking": "t", "signature": "s", "cache_control": {"type": "ephemeral"}, "x": 1}
    for state in (5, True, "text", [signed, 7, {"type": "tool_use", "id": "i"}, {"type": "thinking"}]):
        said = {"role": "assistant", "content": "Hi.", "provider_state": {"anthropic": {"thinking": state}}}
        await answer(
            provider(fake), session, request("normal", [FIRST_TURN[2], said, {"role": "user", "content": "?"}])
        )
    blocks = [r.body["messages"][1]["content"] for r in fake.requests]
    assert blocks[:3] == ["Hi."] * 3
    assert blocks[3] == [{"type": "thinking", "thinking": "t", "signature": "s"}, {"type": "text", "text": "Hi."}]
