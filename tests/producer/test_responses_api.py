"""`POST /v1/responses` and `GET /v1/responses/{id}` on a hub with its embedded worker: the Responses API's request in,
its events out, numbered from the channel alone. The official SDK, three nodes and a killed one:
tests/scaleout/test_openai_sdk.py."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from producer.settings import ProducerSettings
from ssecore.backend_memory import MemoryBackend
from tests.conftest import ClientFactory
from tests.producer.agent_turns import WEATHER
from tests.producer.fake_providers import FakeProviders

Client = TestClient[Any, Any]
TOOL: dict[str, Any] = {"type": "function", **WEATHER["function"]}  # type: ignore[dict-item]  # the flat form


@pytest.fixture
def hub(fake_hub: Client) -> Client:
    return fake_hub


async def events(hub: Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = await hub.post("/v1/responses", json={**body, "stream": True})
    raw = (await resp.read()).decode()
    assert resp.status == 200, raw
    return [orjson.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]


async def test_a_tool_call_with_reasoning_is_items_in_order_then_the_result_goes_back_as_items(
    hub: Client, fake: FakeProviders
) -> None:
    evs = await events(hub, {"model": "openai/tool", "input": "Weather in Paris?", "tools": [TOOL]})
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    kinds = [e["type"] for e in evs]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    added = [e["item"]["type"] for e in evs if e["type"] == "response.output_item.added"]
    assert added == ["reasoning", "message", "function_call"]
    (done,) = [e for e in evs if e["type"] == "response.function_call_arguments.done"]
    assert orjson.loads(done["arguments"]) == {"city": "Paris"} and done["output_index"] == 2
    output = evs[-1]["response"]["output"]
    call = output[2]
    assert (call["type"], call["call_id"], call["name"]) == ("function_call", "call_fake_0", "get_weather")
    assert output[0]["summary"][0]["text"] == "Weather needed." and output[1]["content"][0]["text"] == "Checking."
    # The next turn, in the Responses API's own items: the call, then its output.
    turn = ["Weather in Paris?", call, {"type": "function_call_output", "call_id": call["call_id"], "output": "21C"}]
    body = {"model": "openai/tool", "input": [{"role": "user", "content": turn[0]}, *turn[1:]], "tools": [TOOL]}
    evs = await events(hub, body)
    assert evs[-1]["response"]["output"][0]["content"][0]["text"] == "It is sunny."
    sent = fake.requests[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_fake_0" and sent[2] == {
        "role": "tool", "tool_call_id": "call_fake_0", "content": "21C"}  # fmt: skip


async def test_a_stream_from_any_sequence_number_is_exactly_what_follows_it(hub: Client) -> None:
    whole = await events(hub, {"model": "demo/demo:6", "input": "hi"})
    rid = whole[0]["response"]["id"]
    for n in (-1, 0, 3, len(whole) - 2):
        resp = await hub.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": str(n)})
        raw = (await resp.read()).decode()
        got = [orjson.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
        assert got == whole[n + 1 :]
    record = await (await hub.get(f"/v1/responses/{rid}")).json()
    assert record["status"] == "completed" and record["output"][0]["content"][0]["text"]


async def test_a_failed_generation_is_a_failed_response_and_errors_take_openais_shape(hub: Client) -> None:
    evs = await events(hub, {"model": "openai/stream-error", "input": "hi"})
    assert evs[-1]["type"] == "response.failed" and evs[-1]["response"]["error"]["code"] == "server_error"
    resp = await hub.post("/v1/responses", json={"model": "demo/demo", "input": "hi", "previous_response_id": "r"})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["code"] == "unsupported" and "previous_response_id" in error["message"]
    resp = await hub.get("/v1/responses/resp_nope")
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found_error"


async def test_a_cut_answer_is_an_incomplete_response(hub: Client) -> None:
    evs = await events(hub, {"model": "demo/demo:50", "input": "hi", "max_output_tokens": 3})
    final = evs[-1]
    assert final["type"] == "response.incomplete" and final["response"]["status"] == "incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def _feed(events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    from hub.responses_api import _Events

    encoder = _Events("resp_" + "0" * 24, 0, "openai/m")
    raw = b"".join(
        u for e, d in events for u in encoder.encode(e, d if isinstance(d, str) else orjson.dumps(d).decode())
    )
    return [orjson.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


def test_calls_streamed_at_once_stay_whole_items() -> None:
    """Several calls may be open at once (the channel's contract): each stays one item until its own tool_call."""
    out = _feed(
        [
            ("start", {}),
            ("tool_call_delta", {"index": 0, "id": "a", "name": "f", "arguments": '{"x"'}),
            ("tool_call_delta", {"index": 1, "id": "b", "arguments": '{"y"'}),
            ("tool_call_delta", {"index": 1, "name": "g", "arguments": ":2}"}),  # named after its first fragment
            ("tool_call_delta", {"index": 0, "arguments": ":1}"}),
            ("tool_call", {"index": 0, "id": "a", "name": "f", "arguments": '{"x":1}'}),
            ("tool_call", {"index": 1, "id": "b", "name": "g", "arguments": '{"y":2}'}),
            ("done", {"finish_reason": "tool_calls", "usage": {"input_tokens": 1, "output_tokens": 2}}),
        ]
    )
    calls = [(i["call_id"], i["name"], i["arguments"]) for i in out[-1]["response"]["output"]]
    assert calls == [("a", "f", '{"x":1}'), ("b", "g", '{"y":2}')]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))


def test_events_that_are_not_what_a_generation_writes_do_not_break_the_stream() -> None:
    out = _feed(
        [("start", {}), ("token", "{not json"), ("token", {"text": 5}), ("token", [1]), ("done", {"usage": "x"})]
    )
    assert out[-1]["type"] == "response.completed" and out[-1]["response"]["usage"]["input_tokens"] == 0


def test_a_trimmed_channel_is_told_as_such_not_as_a_restart() -> None:
    out = _feed([("reset", {"reason": "trimmed"})])
    assert out[-1]["type"] == "response.failed" and out[-1]["response"]["error"]["code"] == "trimmed"


async def test_a_background_response_is_not_cancelled_for_going_unwatched(
    make_client: ClientFactory, fake: FakeProviders
) -> None:
    hub = await make_client(
        MemoryBackend(history=10_000, ttl_s=3600),
        worker_settings=ProducerSettings(metrics_port=0, poll_s=0.05, demo_tokens_per_s=20),
        cancel_if_unwatched_s=1,
    )
    queued = await (
        await hub.post("/v1/responses", json={"model": "demo/demo:50", "input": "hi", "background": True})
    ).json()
    for _ in range(100):
        record = await (await hub.get(f"/v1/responses/{queued['id']}")).json()
        if record["status"] not in ("queued", "in_progress"):
            break
        await asyncio.sleep(0.1)
    assert record["status"] == "completed", record


async def test_a_stream_that_ends_before_the_response_says_so(make_client: ClientFactory) -> None:
    """Its clients do not reconnect: no age-out for them, and a cut they are told of."""
    hub = await make_client(
        MemoryBackend(history=10_000, ttl_s=3600),
        worker_settings=ProducerSettings(metrics_port=0, poll_s=0.05, demo_tokens_per_s=40),
        max_connection_age_s=1,
    )
    evs = await events(hub, {"model": "demo/demo:100", "input": "hi"})  # 2.5 s: past the age
    assert evs[-1]["type"] == "response.completed"
