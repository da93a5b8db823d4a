"""The AI SDK's UI messages as a generation's messages, and what `POST /v1/ai-sdk/chat` refuses (400s, never 500s).
The SDK's own client against a hub: tests/producer/test_ai_sdk.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from hub.ai_sdk import _messages
from producer.settings import ProducerSettings
from ssecore.backend_memory import MemoryBackend
from tests.conftest import ClientFactory

PNG = "data:image/png;base64,iVBORw0KGgo="


def test_a_multi_step_answer_becomes_calls_results_and_the_text_after_them() -> None:
    ui: list[dict[str, Any]] = [
        {"id": "s", "role": "system", "parts": [{"type": "text", "text": "Be brief."}]},
        {"id": "u", "role": "user", "parts": [
            {"type": "text", "text": "Weather here?"}, {"type": "file", "mediaType": "image/png", "url": PNG}]},
        {"id": "a", "role": "assistant", "parts": [
            {"type": "step-start"},
            {"type": "reasoning", "text": "Need it."},
            {"type": "text", "text": "Checking."},
            {"type": "tool-get_weather", "toolCallId": "c1", "state": "output-available",
             "input": {"city": "Paris"}, "output": {"temp_c": 21}},
            {"type": "step-start"},
            {"type": "text", "text": "21 degrees."},
        ]},
        {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "Thanks"}]},
    ]  # fmt: skip
    assert _messages(ui) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather here?"}, {"type": "image_url", "image_url": {"url": PNG}}]},
        {"role": "assistant", "content": "Checking.", "reasoning": "Need it.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c":21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {"id": "c", "messages": "hi"},
        {"id": "c", "messages": [5]},
        {"id": "c", "messages": [{"role": "user", "parts": "x"}]},
        {"id": "c", "messages": [{"role": "assistant", "parts": [{"type": 5}, {"type": "tool-x", "input": [1]}]}]},
        {"id": "bad id", "messages": []},
        {"id": ["c"], "messages": []},
        {"id": "c", "messages": [], "surprise": 1},
        [1],
    ],
)
async def test_odd_requests_are_400s(make_client: ClientFactory, body: Any) -> None:
    hub: TestClient[Any, Any] = await make_client(
        MemoryBackend(history=100, ttl_s=3600), worker_settings=ProducerSettings(metrics_port=0)
    )
    resp = await hub.post("/v1/ai-sdk/chat", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
