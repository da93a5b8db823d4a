"""The job API on a hub with its embedded worker: start, stream, inspect and cancel generations."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from hub.appkeys import JOBS
from hub.settings import HubSettings
from producer.settings import ProducerSettings
from ssecore.backend_memory import MemoryBackend
from ssecore.demo import TEXT
from ssecore.jobs import Job
from ssecore.queue_memory import MemoryJobQueue
from ssecore.queue_redis import RedisJobQueue
from tests.conftest import ClientFactory
from tests.producer.agent_turns import WEATHER
from tests.support import RedisServer, collect, settled

Client = TestClient[Any, Any]


async def embedded_hub(
    make_client: ClientFactory, *, tokens_per_s: float, poll_s: float, history: int = 10_000
) -> Client:
    """A hub on the memory backend with its embedded worker, the demo provider at the given pace."""
    return await make_client(
        MemoryBackend(history=history, ttl_s=3600),
        worker_settings=ProducerSettings(demo_tokens_per_s=tokens_per_s, metrics_port=0, poll_s=poll_s),
    )


@pytest.fixture
async def hub(make_client: ClientFactory) -> Client:
    return await embedded_hub(make_client, tokens_per_s=0, poll_s=0.05)


async def start(hub: Client, body: dict[str, Any], status: int = 202) -> dict[str, Any]:
    resp = await hub.post("/v1/generations", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    payload: dict[str, Any] = await resp.json()
    assert resp.status == status, payload
    return payload


DEMO = {"provider": "demo", "model": "demo", "messages": [{"role": "user", "content": "hello there"}]}


async def test_demo_generation_streams_start_tokens_and_one_closing_done(hub: Client) -> None:
    job = await start(hub, DEMO)
    assert job["events_url"] == f"/v1/channels/{job['channel']}/events" and job["channel"] == f"gen:{job['id']}"
    resp = await hub.get(job["events_url"] + "?last_event_id=0")
    evs = await collect(resp, timeout_s=20)  # the response ends by itself at the terminal event
    assert evs[0].event == "start"
    assert orjson.loads(evs[0].data) == {"id": job["id"], "provider": "demo", "model": "demo"}
    tokens = [orjson.loads(e.data)["text"] for e in evs if e.event == "token"]
    assert "".join(tokens) == TEXT
    assert [e.event for e in evs] == ["start"] + ["token"] * len(tokens) + ["done"]
    done = orjson.loads(evs[-1].data)
    assert done["finish_reason"] == "stop" and done["usage"]["output_tokens"] == len(tokens)
    # A reconnect after the end is told there is nothing more.
    assert (await hub.get(job["events_url"], headers={"Last-Event-ID": evs[-1].id})).status == 204
    record = await (await hub.get(f"/v1/generations/{job['id']}")).json()
    assert record["status"] == "done" and record["finish_reason"] == "stop"
    assert record["usage"] == done["usage"] and record["started_at"] <= record["finished_at"]


# A tool whose required properties cover every kind of sample the demo model makes; `note` is optional.
FORECAST: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "The forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "hourly": {"type": "boolean"},
                "where": {
                    "type": "object",
                    "properties": {"country": {"type": "string"}, "region": {"type": "string"}},
                    "required": ["country"],
                },
                "note": {"type": "string"},
            },
            "required": ["city", "days", "unit", "hourly", "where"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What will the weather be in Paris?"}]


async def events_of(hub: Client, job: dict[str, Any]) -> list[tuple[str, Any]]:
    """A generation's whole channel, (event, data) in order, read to its end."""
    evs = await collect(await hub.get(job["events_url"] + "?last_event_id=0"), timeout_s=20)
    return [(e.event, orjson.loads(e.data)) for e in evs]


async def record_of(hub: Client, job: dict[str, Any]) -> dict[str, Any]:
    """What `GET /v1/generations/{id}` shows once the generation is settled."""
    await settled(hub.app[JOBS], job["id"], timeout_s=10)
    record: dict[str, Any] = await (await hub.get(f"/v1/generations/{job['id']}")).json()
    return record


def text_of(events: list[tuple[str, Any]], name: str = "token") -> str:
    return "".join(data["text"] for event, data in events if event == name)


async def test_an_agent_loop_runs_through_the_http_api_with_the_demo_provider(hub: Client) -> None:
    first = await start(hub, {**DEMO, "messages": ASK_WEATHER, "tools": [WEATHER, FORECAST], "tool_choice": "auto"})
    events = await events_of(hub, first)
    names = [name for name, _ in events]
    deltas = [data for name, data in events if name == "tool_call_delta"]
    [call] = [data for name, data in events if name == "tool_call"]
    # Some text, the call's argument fragments, the whole call, and the end; the first tool is called.
    tokens = names.count("token")
    assert names == ["start", *["token"] * tokens, *["tool_call_delta"] * len(deltas), "tool_call", "done"]
    assert text_of(events) and len(deltas) >= 2
    assert deltas[0]["name"] == call["name"] == "get_weather" and deltas[0]["id"] == call["id"]
    assert "".join(d["arguments"] for d in deltas) == call["arguments"]
    assert orjson.loads(call["arguments"]) == {"city": "Paris"}
    done = events[-1][1]
    assert done["finish_reason"] == "tool_calls"
    assert done["message"] == {
        "role": "assistant",
        "content": text_of(events),
        "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}
        ],
    }
    record = await record_of(hub, first)
    assert record["message"] == done["message"] and record["finish_reason"] == "tool_calls"

    # The page's own agent loop: the tool runs here, and the conversation goes back verbatim with its result.
    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 21, "sky": "clear"}'}
    messages = [*ASK_WEATHER, done["message"], result]
    second = await start(hub, {**DEMO, "messages": messages, "tools": [WEATHER, FORECAST]})
    events = await events_of(hub, second)
    assert [name for name, _ in events if name not in ("start", "token")] == ["done"]
    assert text_of(events) == 'The get_weather tool said: {"temp_c": 21, "sky": "clear"}.'
    done = events[-1][1]
    assert done["finish_reason"] == "stop"
    assert done["message"] == {"role": "assistant", "content": text_of(events)}
    assert done["usage"]["output_tokens"] == len(text_of(events).split())
    record = await record_of(hub, second)
    assert record["message"] == done["message"]


async def test_the_demo_model_calls_the_chosen_tool_with_arguments_from_its_schema(hub: Client) -> None:
    chosen = {"type": "function", "function": {"name": "get_forecast"}}
    job = await start(hub, {**DEMO, "messages": ASK_WEATHER, "tools": [WEATHER, FORECAST], "tool_choice": chosen})
    events = await events_of(hub, job)
    [call] = [data for name, data in events if name == "tool_call"]
    assert call["name"] == "get_forecast"
    # Every required property, and nothing else: strings fit their names, enums take their first value.
    assert orjson.loads(call["arguments"]) == {
        "city": "Paris",
        "days": 1,
        "unit": "celsius",
        "hourly": True,
        "where": {"country": "France"},
    }
    assert events[-1][1]["message"]["tool_calls"][0]["function"]["name"] == "get_forecast"
    # Told to call none, it answers in text.
    job = await start(hub, {**DEMO, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "none"})
    events = await events_of(hub, job)
    assert text_of(events) == TEXT and not any(name.startswith("tool_call") for name, _ in events)
    assert events[-1][1]["finish_reason"] == "stop"


async def test_max_tokens_holds_a_tool_call_whole_or_not_at_all(hub: Client) -> None:
    # "Let me check." is three words, the call's arguments {"city": "Paris"} two.
    job = await start(hub, {**DEMO, "messages": ASK_WEATHER, "tools": [WEATHER], "params": {"max_tokens": 5}})
    done = (await events_of(hub, job))[-1][1]
    assert done["finish_reason"] == "tool_calls" and done["usage"]["output_tokens"] == 5
    job = await start(hub, {**DEMO, "messages": ASK_WEATHER, "tools": [WEATHER], "params": {"max_tokens": 4}})
    events = await events_of(hub, job)
    done = events[-1][1]
    assert done["finish_reason"] == "length" and "tool_calls" not in done["message"]
    assert not any(name.startswith("tool_call") for name, _ in events)
    assert done["usage"]["output_tokens"] == len(text_of(events).split()) == 3


async def test_reasoning_effort_streams_the_demo_model_s_reasoning_first(hub: Client) -> None:
    job = await start(hub, {**DEMO, "messages": ASK_WEATHER, "tools": [WEATHER], "reasoning_effort": "low"})
    events = await events_of(hub, job)
    names = [name for name, _ in events]
    reasoning = text_of(events, "reasoning")
    # Apart from the answer, before it, saying what the model will do.
    assert names[1] == "reasoning" and names.index("token") > max(i for i, n in enumerate(names) if n == "reasoning")
    assert "get_weather" in reasoning and reasoning not in text_of(events)
    done = events[-1][1]
    assert done["message"]["reasoning"] == reasoning and done["message"]["content"] == text_of(events)
    assert done["usage"]["reasoning_tokens"] == len(reasoning.split()) < done["usage"]["output_tokens"]
    record = await record_of(hub, job)
    assert record["message"] == done["message"]
    # Sent back verbatim, the reasoning is taken; the answer to the tool result reasons too.
    result = {"role": "tool", "tool_call_id": done["message"]["tool_calls"][0]["id"], "content": "sunny"}
    body = {**DEMO, "messages": [*ASK_WEATHER, done["message"], result], "reasoning_effort": "high"}
    events = await events_of(hub, await start(hub, body))
    assert text_of(events, "reasoning") and text_of(events) == "The get_weather tool said: sunny."


async def test_accept_event_stream_answers_with_the_generation_itself(hub: Client) -> None:
    resp = await hub.post(
        "/v1/generations",
        data=orjson.dumps({**DEMO, "params": {"max_tokens": 5}}),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    evs = await collect(resp, timeout_s=20)
    assert [e.event for e in evs] == ["start"] + ["token"] * 5 + ["done"]
    assert orjson.loads(evs[-1].data)["finish_reason"] == "length"


async def test_cancel_stops_the_generation_within_a_second(make_client: ClientFactory) -> None:
    hub = await embedded_hub(make_client, tokens_per_s=50, poll_s=0.1)
    job = await start(hub, {**DEMO, "model": "demo:100000"})
    resp = await hub.get(job["events_url"] + "?last_event_id=0")
    await collect(resp, count=5, timeout_s=10)  # start + a few tokens: it is running
    asked = time.monotonic()
    cancel = await hub.delete(f"/v1/generations/{job['id']}")
    assert cancel.status == 202
    rest = await collect(resp, timeout_s=10)
    assert time.monotonic() - asked < 1.5
    assert rest[-1].event == "done" and orjson.loads(rest[-1].data)["finish_reason"] == "cancelled"
    assert all(e.event == "token" for e in rest[:-1])
    record = await (await hub.get(f"/v1/generations/{job['id']}")).json()
    assert record["status"] == "cancelled"
    again = await hub.delete(f"/v1/generations/{job['id']}")
    assert again.status == 409 and (await again.json())["error"] == "generation_finished"


async def test_unwatched_generation_is_cancelled_and_a_watched_one_is_not(make_client: ClientFactory) -> None:
    hub = await embedded_hub(make_client, tokens_per_s=20, poll_s=0.1, history=100_000)
    abandoned = await start(hub, {**DEMO, "model": "demo:100000", "cancel_if_unwatched_s": 1})
    watched = await start(hub, {**DEMO, "model": "demo:100000", "cancel_if_unwatched_s": 1})
    viewer = await hub.get(watched["events_url"] + "?last_event_id=0")
    deadline = time.monotonic() + 15
    while (await (await hub.get(f"/v1/generations/{abandoned['id']}")).json())["status"] != "cancelled":
        assert time.monotonic() < deadline, "an unwatched generation kept running"
        await asyncio.sleep(0.2)
    record = await (await hub.get(f"/v1/generations/{abandoned['id']}")).json()
    assert record["finish_reason"] == "unwatched"
    assert (await (await hub.get(f"/v1/generations/{watched['id']}")).json())["status"] == "running"
    await hub.delete(f"/v1/generations/{watched['id']}")
    evs = await collect(viewer, timeout_s=10)
    assert orjson.loads(evs[-1].data)["finish_reason"] == "cancelled"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({**DEMO, "provider": "nope"}, "unknown_provider"),
        ({**DEMO, "messages": []}, "invalid_messages"),
        ({**DEMO, "messages": [{"role": "user", "content": ""}]}, "invalid_messages"),
        ({**DEMO, "messages": [{"role": "wizard", "content": "x"}]}, "invalid_messages"),
        ({**DEMO, "messages": [{"role": "system", "content": "only a system prompt"}]}, "invalid_messages"),
        ({**DEMO, "params": {"temperature": 7}}, "invalid_params"),
        ({**DEMO, "params": {"max_tokens": 0}}, "invalid_params"),
        ({**DEMO, "params": {"max_tokens": True}}, "invalid_params"),
        ({**DEMO, "params": {"top_p": "high"}}, "invalid_params"),
        ({**DEMO, "params": {"stop": [1]}}, "invalid_params"),
        ({**DEMO, "params": {"stop": "x" * 201}}, "invalid_params"),
        ({**DEMO, "params": {"stop": ["ok", "x" * 201]}}, "invalid_params"),
        ({**DEMO, "params": {"stop": ["x"] * 9}}, "invalid_params"),
        ({**DEMO, "model": "demo:999999999999"}, "invalid_model"),
        ({**DEMO, "model": "demo:100001"}, "invalid_model"),
        ({**DEMO, "model": "demo:0"}, "invalid_model"),
        ({**DEMO, "model": "demo:-5"}, "invalid_model"),
        ({**DEMO, "model": "demo:12abc"}, "invalid_model"),
        ({**DEMO, "model": "x" * 201}, "invalid_model"),
        ({**DEMO, "messages": [{"role": "user", "content": "x"}] * 1001}, "invalid_messages"),
        ({**DEMO, "params": {"max_tokens": 1_000_001}}, "invalid_params"),
        ({**DEMO, "params": {"seed": 1}}, "invalid_params"),
        ({**DEMO, "channel": "bad channel"}, "invalid_channel"),
        ({**DEMO, "provider": "openai", "model": ""}, "invalid_model"),
        ({**DEMO, "cancel_if_unwatched_s": 0}, "invalid_body"),
        ({**DEMO, "extra": 1}, "invalid_body"),
        ([DEMO], "invalid_body"),
    ],
)
async def test_bad_jobs_get_a_400_and_nothing_is_queued(hub: Client, body: Any, code: str) -> None:
    resp = await hub.post("/v1/generations", data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"] == code
    jobs = hub.app[JOBS]
    assert isinstance(jobs, MemoryJobQueue) and not jobs._pending and not jobs._records


async def test_unknown_generation_is_404(hub: Client) -> None:
    assert (await hub.get("/v1/generations/gen_nope")).status == 404
    assert (await hub.delete("/v1/generations/gen_nope")).status == 404


async def test_the_largest_demo_model_is_accepted(hub: Client) -> None:
    job = await start(hub, {**DEMO, "model": "demo:100000", "params": {"max_tokens": 3, "stop": ["x" * 200] * 8}})
    record = await settled(hub.app[JOBS], job["id"], timeout_s=20)
    assert record.status == "done" and record.finish_reason == "length"


async def test_a_hub_without_the_demo_provider_refuses_demo_jobs(make_client: ClientFactory) -> None:
    # No worker: nothing here may call a provider.
    hub = await make_client(MemoryBackend(history=100, ttl_s=3600), demo=False, embedded_worker="off")
    refused = await start(hub, DEMO, status=400)
    assert refused["error"] == "unknown_provider" and "demo" not in refused["message"]
    jobs = hub.app[JOBS]
    assert isinstance(jobs, MemoryJobQueue) and not jobs._pending and not jobs._records
    # Other providers are still taken.
    await start(hub, {**DEMO, "provider": "openai", "model": "gpt-4o-mini"})


def test_the_demo_provider_is_switched_off_by_flag_or_environment() -> None:
    assert HubSettings.from_args(["--anonymous"], {}).demo
    assert not HubSettings.from_args(["--anonymous", "--no-demo"], {}).demo
    assert not HubSettings.from_args(["--anonymous"], {"HUB_DEMO": "false"}).demo
    assert HubSettings.from_args(["--anonymous", "--demo"], {"HUB_DEMO": "false"}).demo  # the flag wins
    assert not ProducerSettings.from_args(["--no-demo"], {}).demo
    assert not ProducerSettings.from_args([], {"PRODUCER_DEMO": "off"}).demo


async def test_a_running_generation_keeps_its_owner_s_slot_by_redis_clock_not_the_worker_s(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot taken at submit lasts as long as the record, on Redis' clock; the worker's refresh of it as the
    generation runs must count on the same clock, or a worker whose clock is off keeps slots for days, or none."""
    queue = RedisJobQueue(redis_server.url, prefix=f"test:{uuid.uuid4().hex[:12]}:", group="g", record_ttl_s=60)
    try:
        job = Job("gen_1", "demo", "demo", [{"role": "user", "content": "hi"}], "gen:gen_1", owner="jwt:alice")
        record = await queue.submit(job, max_active=1)
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() + 1_000_000)  # this worker's clock is 11 days ahead
        await queue.update(dataclasses.replace(record, status="running"))
        monkeypatch.undo()
        secs, micros = await queue._redis.time()
        redis_now_ms = secs * 1000 + micros // 1000
        score = await queue._redis.zscore(queue.keys.active("jwt:alice"), "gen_1")
        assert redis_now_ms + 50_000 <= score <= redis_now_ms + 61_000
    finally:
        await queue.aclose()


def test_demo_arguments_come_from_any_schema_a_request_may_carry() -> None:
    """A tool schema is the caller's: odd types (objects, lists of anything) give a sample, not a worker crash."""
    from ssecore.demo import sample_arguments

    schema = {
        "type": "object",
        "properties": {"a": {"type": {"x": 1}}, "b": {"type": ["x", {}]}, "city": {"type": "string"}},
        "required": ["a", "b", "city"],
    }
    assert sample_arguments(schema) == {"a": "demo", "b": "demo", "city": "Paris"}
