"""The answer builder: provider items in, channel events and the whole assistant message out."""

from __future__ import annotations

from typing import Any

import orjson

from producer.answer import Answer, usage_of
from producer.providers.base import Finish, ReasoningDelta, StreamItem, TextDelta, ToolCallDelta, ToolCallEnd


def run(answer: Answer, items: list[StreamItem]) -> list[tuple[str, Any]]:
    return [(e.event, orjson.loads(e.data)) for item in items for e in answer.events(item)]


def test_tool_calls_stream_as_deltas_then_whole_calls_and_end_in_the_message() -> None:
    answer = Answer("anthropic")
    finish = Finish("tool_calls", 10, 20, reasoning_tokens=5, provider_state={"thinking": [{"signature": "s"}]})
    events = run(
        answer,
        [
            ReasoningDelta("Weather needed."),
            TextDelta("Checking."),
            ToolCallDelta(0, "", id="toolu_1", name="get_weather"),
            ToolCallDelta(0, '{"city":'),
            ToolCallDelta(1, '{"city":"Oslo"}', name="get_weather"),  # no id from the provider: one is made up
            ToolCallDelta(0, '"Paris"}'),
            ToolCallEnd(0),
            ToolCallDelta(2, "", id="toolu_3", name="get_time"),  # never ends explicitly: ended by the Finish
            finish,
        ],
    )
    made_up = next(data["id"] for name, data in events if name == "tool_call_delta" and data["index"] == 1)
    assert isinstance(made_up, str) and made_up.startswith("call_")
    assert events == [
        ("reasoning", {"text": "Weather needed."}),
        ("token", {"text": "Checking."}),
        ("tool_call_delta", {"index": 0, "id": "toolu_1", "name": "get_weather", "arguments": ""}),
        ("tool_call_delta", {"index": 0, "arguments": '{"city":'}),
        ("tool_call_delta", {"index": 1, "id": made_up, "name": "get_weather", "arguments": '{"city":"Oslo"}'}),
        ("tool_call_delta", {"index": 0, "arguments": '"Paris"}'}),
        ("tool_call", {"index": 0, "id": "toolu_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}),
        ("tool_call_delta", {"index": 2, "id": "toolu_3", "name": "get_time", "arguments": ""}),
        ("tool_call", {"index": 1, "id": made_up, "name": "get_weather", "arguments": '{"city":"Oslo"}'}),
        ("tool_call", {"index": 2, "id": "toolu_3", "name": "get_time", "arguments": "{}"}),
    ]
    assert answer.message(finish) == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": made_up, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "toolu_3", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
        "reasoning": "Weather needed.",
        "provider_state": {"anthropic": {"thinking": [{"signature": "s"}]}},
    }
    assert usage_of(finish) == {"input_tokens": 10, "output_tokens": 20, "reasoning_tokens": 5}


def test_a_cut_answer_keeps_only_complete_calls_and_a_call_only_answer_has_null_content() -> None:
    answer = Answer("openai")
    run(answer, [ToolCallDelta(0, "{}", id="a", name="f"), ToolCallEnd(0), ToolCallDelta(1, '{"x', id="b", name="g")])
    assert answer.message() == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert Answer("openai").message() == {"role": "assistant", "content": ""}
    assert usage_of(None) == {"input_tokens": None, "output_tokens": None}


def test_a_call_the_output_cap_cut_off_is_no_call() -> None:
    """Its JSON is unfinished: sent back, the next turn would fail at the provider. A complete one stays."""
    answer = Answer("anthropic")
    events = run(
        answer,
        [
            ToolCallDelta(0, '{"city": "Paris"}', id="a", name="get_weather"),
            ToolCallDelta(1, '{"city": "Os', id="b", name="get_weather"),
            Finish("length"),
        ],
    )
    assert [data["id"] for name, data in events if name == "tool_call"] == ["a"]
    assert [c["id"] for c in answer.message(Finish("length"))["tool_calls"]] == ["a"]
