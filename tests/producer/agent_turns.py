"""What the tool, reasoning and agent-loop tests of every provider share: an agent turn in the request vocabulary,
and a provider stream run through the worker's answer builder."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from producer.answer import Answer
from producer.providers.base import Finish, GenerationRequest, Provider, StreamItem

PNG = "data:image/png;base64,iVBORw0KGgo="
PDF = "data:application/pdf;base64,JVBERi0xLjQK"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
# A user turn with every kind of part.
USER_TURN: dict[str, Any] = {
    "role": "user",
    "content": [
        {"type": "text", "text": "Where is this, and what is the weather there?"},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "file", "file": {"file_data": PDF, "filename": "trip.pdf"}},
    ],
}
FIRST_TURN: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": "Call tools when you need facts."},
    USER_TURN,
]


def request(model: str, messages: list[dict[str, Any]], **fields: Any) -> GenerationRequest:
    return GenerationRequest(model=model, messages=messages, **fields)


async def items(provider: Provider, session: aiohttp.ClientSession, req: GenerationRequest) -> list[StreamItem]:
    """The whole stream, checking the contract: exactly one Finish, last."""
    out = [item async for item in provider.stream(session, req)]
    assert out and isinstance(out[-1], Finish) and not any(isinstance(i, Finish) for i in out[:-1])
    return out


async def answer(
    provider: Provider, session: aiohttp.ClientSession, req: GenerationRequest
) -> tuple[list[tuple[str, Any]], dict[str, Any], Finish]:
    """The channel events the worker would write, the `done.message`, and the Finish."""
    built = Answer(provider.kind)
    stream = await items(provider, session, req)
    events = [(e.event, orjson.loads(e.data)) for item in stream for e in built.events(item)]
    finish = stream[-1]
    assert isinstance(finish, Finish)
    return events, built.message(finish), finish


def tool_result(message: dict[str, Any], content: str = '{"temp_c": 21}') -> list[dict[str, Any]]:
    """The tool results answering every call of `message`."""
    return [{"role": "tool", "tool_call_id": c["id"], "content": content} for c in message.get("tool_calls", [])]
