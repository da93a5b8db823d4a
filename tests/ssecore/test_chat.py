"""The chat vocabulary of a generation request: what is accepted as given, what is refused with the field named, and
what each provider kind cannot serve (refused before anything is queued)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ssecore.jobs import Job, JobRequestError, parse_job_request

PNG = "data:image/png;base64,iVBORw0KGgo="
PDF = "data:application/pdf;base64,JVBERi0xLjQK"
TIFF = "data:image/tiff;base64,SUkqAA=="
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
KINDS = {"openai": "openai", "anthropic": "anthropic", "gemini": "gemini", "demo": "demo", "resp": "openai-responses"}
# A whole agent turn: every role, every part, a call answered by its result.
LOOP = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture, and the weather there?"},
            {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
            {"type": "file", "file": {"file_data": PDF, "filename": "notes.pdf"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [CALL],
        "reasoning": "Need the weather.",
        "provider_state": {"anthropic": {"thinking": []}},
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]


def job(provider: str = "openai", **fields: Any) -> Job:
    body = {"provider": provider, "model": "m", "messages": LOOP, "tools": [WEATHER], **fields}
    return parse_job_request(body, providers=KINDS, generation_id="gen_x", channel_ok=lambda _name: True)


def refused(provider: str = "openai", **fields: Any) -> JobRequestError:
    with pytest.raises(JobRequestError) as info:
        job(provider, **fields)
    return info.value


def test_a_whole_agent_turn_is_accepted_and_kept_as_given() -> None:
    fields: dict[str, Any] = {
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        "reasoning_effort": "high",
    }
    j = job(**fields)
    assert j.messages == LOOP and j.tools == [WEATHER]
    assert (j.tool_choice, j.parallel_tool_calls, j.reasoning_effort) == (fields["tool_choice"], False, "high")
    assert j.response_format == fields["response_format"]
    # Through the queue and back, unchanged.
    assert Job.loads(j.dumps()) == j


def test_an_empty_answer_goes_back_as_it_came() -> None:
    """What done.message holds for an answer cancelled before anything, or spent on reasoning."""
    empty = {"role": "assistant", "content": "", "reasoning": "Hmm."}
    turn = [{"role": "user", "content": "hi"}, empty, {"role": "user", "content": "again?"}]
    assert job(messages=turn).messages[1] == empty


def test_json_nested_past_what_is_stored_is_refused() -> None:
    deep: Any = {}
    for _ in range(100):
        deep = {"a": deep}
    e = refused(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "provider_state": deep}]
    )
    assert e.code == "invalid_body" and "nested deeper than 64" in e.message


def test_a_plain_job_is_stored_without_the_chat_fields() -> None:
    """So a worker that predates them still reads a text job."""
    j = parse_job_request(
        {"provider": "demo", "messages": [{"role": "user", "content": "hi"}]},
        providers=KINDS,
        generation_id="gen_x",
        channel_ok=lambda _name: True,
    )
    stored = orjson.loads(j.dumps())
    assert not {"tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort"} & set(stored)


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, "invalid_messages", "messages[0]"),
        ({"messages": [*LOOP, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "invalid_messages", "[5]"),
        ({"messages": [*LOOP, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, "invalid_messages", "[5]"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, "invalid_messages", "content[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
            "invalid_messages",
            "image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PDF}}]}]},
            "invalid_messages",
            "not of an image",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "abc"}}]}]},
            "invalid_messages",
            "file_data",
        ),
        (
            {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]},
            "invalid_messages",
            "messages[0].content[0].type",
        ),
        # Each call answered before the conversation goes on, and by the end.
        (
            {"messages": [*LOOP[:4], {"role": "user", "content": "and?"}]},
            "invalid_messages",
            "messages[4] comes before",
        ),
        ({"messages": LOOP[:4]}, "invalid_messages", "messages[3].tool_calls need their tool results"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [CALL, CALL]}]},
            "invalid_messages",
            "same id",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "x", "provider_state": "sig"},
                ]
            },
            "invalid_messages",
            "provider_state",
        ),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}]}, "invalid_messages", "tool_calls"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "invalid_tools",
            "tools[0].function.name",
        ),
        ({"tools": [WEATHER, WEATHER]}, "invalid_tools", "repeats"),
        ({"tools": [{"type": "retrieval"}]}, "invalid_tools", "tools[0]"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_tools", "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "invalid_tools", "tool_choice"),
        ({"tool_choice": "sometimes"}, "invalid_tools", "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "invalid_tools", "parallel_tool_calls"),
        ({"response_format": {"type": "xml"}}, "invalid_response_format", "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "w"}}},
            "invalid_response_format",
            "response_format.json_schema.schema",
        ),
        ({"reasoning_effort": "extreme"}, "invalid_params", "reasoning_effort"),
        # JSON objects where a name belongs (unhashable: a set lookup would raise, a 500)
        ({"messages": [{"role": {"a": 1}, "content": "x"}]}, "invalid_messages", "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]}, "invalid_messages", "content[0].type"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG, "detail": []}}]}
                ]
            },
            "invalid_messages",
            "detail",
        ),
        ({"tool_choice": {"a": 1}}, "invalid_tools", "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": [1]}}}, "invalid_tools", "tool_choice"),
        ({"reasoning_effort": ["low"]}, "invalid_params", "reasoning_effort"),
    ],
)
def test_invalid_requests_are_refused_naming_the_field(change: dict[str, Any], code: str, field: str) -> None:
    e = refused(**change)
    assert e.code == code and field in e.message, e.message


@pytest.mark.parametrize(
    ("provider", "change", "field"),
    [
        # Gemini takes inline images only, and has no switch for one call at a time.
        (
            "gemini",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        ("gemini", {"parallel_tool_calls": False}, "parallel_tool_calls"),
        # Anthropic: its image types and PDFs only, a schema for JSON, and no forced tool or sampling while thinking.
        (
            "anthropic",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": TIFF}}]}]},
            "messages[0].content[0].image_url.url",
        ),
        (
            "anthropic",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_data": "data:text/csv;base64,YQ=="}}]}
                ]
            },
            "messages[0].content[0].file.file_data",
        ),
        ("anthropic", {"response_format": {"type": "json_object"}}, "response_format"),
        ("anthropic", {"params": {"temperature": 1.5}}, "params.temperature"),
        ("anthropic", {"reasoning_effort": "low", "tool_choice": "required"}, "tool_choice"),
        ("anthropic", {"reasoning_effort": "low", "params": {"temperature": 0.2}}, "params.temperature"),
        ("resp", {"params": {"stop": ["END"]}}, "params.stop"),
        ("demo", {"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_what_a_provider_cannot_do_is_refused_naming_the_field(
    provider: str, change: dict[str, Any], field: str
) -> None:
    e = refused(provider, **change)
    assert e.code == "unsupported" and e.message.startswith(f"{field}: provider {provider} "), e.message


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini", "resp"])
def test_every_provider_takes_an_agent_turn_with_images_files_and_tools(provider: str) -> None:
    assert job(provider, tool_choice="auto", reasoning_effort="medium").messages == LOOP
