"""The HTTP API of one hub node, on both backends: publish, subscribe, resume, reset, close, errors."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from ssecore.backend import Backend
from ssecore.sse import SSEParser
from tests.conftest import BackendFactory, ClientFactory
from tests.support import collect

Client = TestClient[Any, Any]
EVENTS = "/v1/channels/{}/events"


async def publish(client: Client, channel: str, body: Any, status: int = 201) -> list[str]:
    resp = await client.post(
        EVENTS.format(channel), data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )
    payload = await resp.json()
    assert resp.status == status, payload
    ids: list[str] = payload.get("ids", [])
    return ids


async def subscribe(client: Client, channel: str, *, last_id: str | None = None, query: str | None = None) -> Any:
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    url = EVENTS.format(channel) + (f"?last_event_id={query}" if query is not None else "")
    return await client.get(url, headers=headers)


async def test_live_stream_headers_preamble_and_events(client: Client) -> None:
    resp = await subscribe(client, "chat:1")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert first.startswith(b"retry: 2000")
    comment = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert comment.startswith(b":")
    ids = await publish(client, "chat:1", {"event": "token", "data": "hello"})
    [ev] = await collect(resp, count=1)
    assert (ev.id, ev.event, ev.data) == (ids[0], "token", "hello")
    resp.close()


async def test_live_stream_starts_after_existing_history(client: Client) -> None:
    await publish(client, "c", [{"data": "old-1"}, {"data": "old-2"}])
    resp = await subscribe(client, "c")
    await publish(client, "c", {"data": "new"})
    [ev] = await collect(resp, count=1)
    assert ev.data == "new"
    resp.close()


async def test_string_data_is_verbatim_and_json_is_compact(client: Client) -> None:
    resp = await subscribe(client, "c")
    await publish(client, "c", [{"data": "plain"}, {"data": {"a": [1, 2], "b": None}}, {"data": 3.5}, {"data": '"q"'}])
    evs = await collect(resp, count=4)
    assert [e.data for e in evs] == ["plain", '{"a":[1,2],"b":null}', "3.5", '"q"']
    assert [e.event for e in evs] == ["message"] * 4
    resp.close()


async def test_multiline_data_round_trips_through_the_wire(client: Client) -> None:
    data = "a\r\nb\rc\nd\n\n\re\r\n"
    resp = await subscribe(client, "c")
    await publish(client, "c", {"data": data})
    [ev] = await collect(resp, count=1)
    # SSE carries line breaks, not their kind: every CRLF, CR or LF reads back as LF.
    assert ev.data == "a\nb\nc\nd\n\n\ne\n"
    resp.close()


async def test_batch_is_appended_in_order_and_read_back_in_order(client: Client) -> None:
    batch = [{"event": "token", "data": f"t{i}"} for i in range(50)]
    ids = await publish(client, "c", batch)
    assert len(ids) == 50 and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    resp = await subscribe(client, "c", query="0")
    evs = await collect(resp, count=50)
    assert [e.data for e in evs] == [f"t{i}" for i in range(50)]
    assert [e.id for e in evs] == ids
    resp.close()


async def test_resume_by_header_and_by_query_and_header_wins(client: Client) -> None:
    ids = await publish(client, "c", [{"data": str(i)} for i in range(5)])
    by_header = await subscribe(client, "c", last_id=ids[1])
    assert [e.data for e in await collect(by_header, count=3)] == ["2", "3", "4"]
    by_query = await subscribe(client, "c", query=ids[3])
    assert [e.data for e in await collect(by_query, count=1)] == ["4"]
    both = await subscribe(client, "c", last_id=ids[2], query=ids[0])
    assert [e.data for e in await collect(both, count=2)] == ["3", "4"]
    for r in (by_header, by_query, both):
        r.close()


async def test_last_event_id_zero_replays_whole_history_then_goes_live(client: Client) -> None:
    await publish(client, "c", [{"data": "a"}, {"data": "b"}])
    resp = await subscribe(client, "c", query="0")
    assert [e.data for e in await collect(resp, count=2)] == ["a", "b"]
    await publish(client, "c", {"data": "c"})
    assert [e.data for e in await collect(resp, count=1)] == ["c"]
    resp.close()


async def test_joining_the_live_feed_after_history_is_exact_under_concurrent_publishing(
    make_client: ClientFactory, backend: Backend
) -> None:
    # A small replay page forces several history round trips while the publisher keeps appending.
    client = await make_client(backend, replay_page=7)
    total = 600
    done = asyncio.Event()

    async def publisher() -> None:
        for i in range(0, total, 3):
            await publish(client, "race", [{"data": str(j)} for j in range(i, i + 3)])
            if i % 30 == 0:
                await asyncio.sleep(0)
        done.set()

    first = await publish(client, "race", {"data": "start"})
    task = asyncio.create_task(publisher())
    subscribers = []
    for _ in range(5):
        await asyncio.sleep(0.01)
        subscribers.append(await subscribe(client, "race", last_id=first[0]))
    await task
    for resp in subscribers:
        evs = await collect(resp, count=total, timeout_s=20)
        assert [e.data for e in evs] == [str(i) for i in range(total)]
        assert len({e.id for e in evs}) == total
        resp.close()


async def test_resume_across_trimmed_history_sends_reset_first(
    make_client: ClientFactory, make_backend: BackendFactory
) -> None:
    client = await make_client(make_backend(history=10))
    first = (await publish(client, "c", {"data": "0"}))[0]
    for i in range(1, 300, 20):
        await publish(client, "c", [{"data": str(j)} for j in range(i, i + 20)])
    info = await (await client.get("/v1/channels/c")).json()
    resp = await subscribe(client, "c", last_id=first)
    evs = await collect(resp, count=info["length"] + 1)
    reset = evs[0]
    assert reset.event == "reset"
    body = orjson.loads(reset.data)
    assert body["reason"] == "trimmed" and body["requested"] == first
    assert reset.id == body["continue_after"]
    # After the reset: exactly the retained entries, none skipped.
    assert evs[1].id == info["first_id"] and evs[-1].id == info["last_id"]
    assert [int(e.data) for e in evs[1:]] == list(range(301 - info["length"], 301))
    resp.close()
    # Resuming from the reset's id is exact and needs no second reset.
    again = await subscribe(client, "c", last_id=reset.id)
    evs2 = await collect(again, count=1)
    assert evs2[0].event == "message" and evs2[0].id == info["first_id"]
    again.close()


async def test_resume_on_expired_channel_sends_reset(make_client: ClientFactory, make_backend: BackendFactory) -> None:
    client = await make_client(make_backend(ttl_s=0.3))
    ids = await publish(client, "c", [{"data": "a"}, {"data": "b"}])
    await asyncio.sleep(0.6)
    assert (await client.get("/v1/channels/c")).status == 404
    resp = await subscribe(client, "c", last_id=ids[0])
    [reset] = await collect(resp, count=1)
    assert reset.event == "reset" and orjson.loads(reset.data)["reason"] == "expired"
    await publish(client, "c", {"data": "fresh"})
    [ev] = await collect(resp, count=1)
    assert ev.data == "fresh"
    resp.close()


async def test_close_ends_streams_and_reconnect_after_end_gets_204(client: Client) -> None:
    live = await subscribe(client, "gen")
    ids = await publish(
        client, "gen", [{"event": "token", "data": "x"}, {"event": "done", "data": "{}", "close": True}]
    )
    evs = await collect(live)  # the response ends by itself after the close event
    assert [e.event for e in evs] == ["token", "done"]
    reconnect = await subscribe(client, "gen", last_id=ids[1])
    assert reconnect.status == 204
    assert (await subscribe(client, "gen")).status == 204
    late = await subscribe(client, "gen", last_id=ids[0])
    assert [e.event for e in await collect(late)] == ["done"]
    info = await (await client.get("/v1/channels/gen")).json()
    assert info["closed"] is True
    await publish(client, "gen", {"data": "more"}, status=409)
    assert (await (await client.get("/v1/channels/gen")).json()) == info


async def test_delete_resets_live_subscribers_and_removes_channel(client: Client) -> None:
    await publish(client, "c", {"data": "a"})
    resp = await subscribe(client, "c")
    await asyncio.sleep(0.1)  # let the node's tail pick the channel up
    assert (await client.delete("/v1/channels/c")).status == 204
    evs = await collect(resp)
    assert [e.event for e in evs] == ["reset"]
    assert orjson.loads(evs[0].data)["reason"] == "deleted"
    assert (await client.get("/v1/channels/c")).status == 404
    assert (await client.delete("/v1/channels/c")).status == 404


async def test_channel_info(client: Client) -> None:
    assert (await client.get("/v1/channels/nope")).status == 404
    ids = await publish(client, "c", [{"data": "a"}, {"data": "b"}])
    info = await (await client.get("/v1/channels/c")).json()
    assert info == {"length": 2, "first_id": ids[0], "last_id": ids[1], "closed": False}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [
        ("POST", "/v1/channels/c/events", b"{nope", {"Content-Type": "application/json"}, 400, "invalid_json"),
        # A lone surrogate is not text: it could not be sent as UTF-8 to any subscriber.
        (
            "POST",
            "/v1/channels/c/events",
            b'{"data":"\\ud800"}',
            {"Content-Type": "application/json"},
            400,
            "invalid_json",
        ),
        ("POST", "/v1/channels/c/events", b"[]", {"Content-Type": "application/json"}, 400, "invalid_body"),
        ("POST", "/v1/channels/c/events", b'"x"', {"Content-Type": "application/json"}, 400, "invalid_body"),
        ("POST", "/v1/channels/c/events", b'{"event":"a"}', {"Content-Type": "application/json"}, 400, "invalid_body"),
        (
            "POST",
            "/v1/channels/c/events",
            b'{"data":1,"x":2}',
            {"Content-Type": "application/json"},
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/channels/c/events",
            b'{"event":"a\\nb","data":1}',
            {"Content-Type": "application/json"},
            400,
            "invalid_event",
        ),
        (
            "POST",
            "/v1/channels/c/events",
            b'{"event":"","data":1}',
            {"Content-Type": "application/json"},
            400,
            "invalid_event",
        ),
        (
            "POST",
            "/v1/channels/c/events",
            b'{"data":1,"close":"yes"}',
            {"Content-Type": "application/json"},
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/channels/c/events",
            b'[{"data":1,"close":true},{"data":2}]',
            {"Content-Type": "application/json"},
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/channels/bad%20name/events",
            b'{"data":1}',
            {"Content-Type": "application/json"},
            400,
            "invalid_channel",
        ),
        (
            "POST",
            "/v1/channels/" + "x" * 201 + "/events",
            b'{"data":1}',
            {"Content-Type": "application/json"},
            400,
            "invalid_channel",
        ),
        ("POST", "/v1/channels/c/events", b'{"data":1}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (
            "POST",
            "/v1/channels/c/events",
            b'{"data":"' + b"x" * 5000 + b'"}',
            {"Content-Type": "application/json"},
            413,
            "body_too_large",
        ),
        ("GET", "/v1/channels/c/events", b"", {"Last-Event-ID": "abc"}, 400, "invalid_id"),
        ("GET", "/v1/channels/c/events?last_event_id=1-2-3", b"", {}, 400, "invalid_id"),
        ("GET", "/v1/channels/c/events?last_event_id=-1", b"", {}, 400, "invalid_id"),
        ("GET", "/v1/channels/c/events", b"", {"Last-Event-ID": "99999999999999999999999-0"}, 400, "invalid_id"),
        ("GET", "/v1/channels/a%0Ab/events", b"", {}, 400, "invalid_channel"),
        ("GET", "/v1/channels/a..b/events", b"", {}, 400, "invalid_channel"),
        ("GET", "/v1/channels/nope", b"", {}, 404, "channel_not_found"),
        ("HEAD", "/v1/channels/c/events", b"", {}, 405, None),
        (
            "POST",
            "/v1/channels/c/events",
            b'{"event":"reset","data":"forged"}',
            {"Content-Type": "application/json"},
            400,
            "reserved_event",
        ),
        ("PUT", "/v1/channels/c/events", b"", {}, 405, "method_not_allowed"),
        ("GET", "/v2/nothing", b"", {}, 404, "not_found"),
    ],
)
async def test_bad_requests_get_a_json_error_and_change_nothing(
    make_client: ClientFactory,
    backend: Backend,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    client = await make_client(backend, max_body_bytes=4096)
    ids = await publish(client, "c", {"data": "before"})
    resp = await client.request(method, path, data=body or None, headers=headers)
    assert resp.status == status
    if code is not None:  # a HEAD response has no body
        assert resp.headers["Content-Type"].startswith("application/json")
        payload = await resp.json()
        assert payload["error"] == code and isinstance(payload["message"], str) and payload["message"]
    info = await (await client.get("/v1/channels/c")).json()
    assert info == {"length": 1, "first_id": ids[0], "last_id": ids[0], "closed": False}


async def test_heartbeat_comments_keep_the_stream_alive(make_client: ClientFactory, backend: Backend) -> None:
    client = await make_client(backend, heartbeat_s=0.1)
    resp = await subscribe(client, "c")
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b"retry: 2000\n\n"
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b": ok\n\n"
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b"id: 0-0\n\n"
    beat = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert beat == b": keep-alive\n\n"
    resp.close()


async def test_health_readiness_and_metrics(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    resp = await subscribe(client, "m")
    await publish(client, "m", [{"data": "a"}, {"data": "b"}])
    await collect(resp, count=2)
    text = await (await client.get("/metrics")).text()
    for name in (
        "hub_connections_open 1.0",
        "hub_events_published_total 2.0",
        "hub_events_delivered_total 2.0",
        "hub_publish_duration_seconds_count 1.0",
        "hub_delivery_lag_seconds_count 2.0",
        "hub_backend_errors_total",
        "hub_slow_consumer_disconnects_total",
        "hub_resets_total",
    ):
        assert name in text, name
    resp.close()


async def test_live_stream_tells_its_position_so_an_early_reconnect_misses_nothing(client: Client) -> None:
    await publish(client, "c", {"data": "history"})
    resp = await subscribe(client, "c")
    parser = SSEParser()
    async with asyncio.timeout(5):
        while not parser.last_event_id:
            assert parser.feed(await resp.content.readany()) == []  # the preamble dispatches no event
    resp.close()  # dropped before the first token, as happens while a model thinks
    await publish(client, "c", [{"data": "t1"}, {"data": "t2"}])
    again = await subscribe(client, "c", last_id=parser.last_event_id)
    assert [e.data for e in await collect(again, count=2)] == ["t1", "t2"]
    again.close()


async def test_blank_resume_position_means_live(client: Client) -> None:
    await publish(client, "c", {"data": "old"})
    resp = await subscribe(client, "c", last_id="  ", query="%20")
    assert resp.status == 200
    await publish(client, "c", {"data": "new"})
    assert [e.data for e in await collect(resp, count=1)] == ["new"]
    resp.close()


async def test_live_subscriber_is_ended_not_skipped_when_entries_it_has_not_read_are_trimmed(
    make_client: ClientFactory, make_backend: BackendFactory
) -> None:
    client = await make_client(make_backend(history=5))
    resp = await subscribe(client, "c")
    first = await publish(client, "c", {"data": "0"})
    [ev] = await collect(resp, count=1)
    assert ev.id == first[0]
    # One batch far larger than the history: most of it is trimmed before the node's live tail can read it from the
    # store. A tail that takes the batch whole as it is appended (the Redis backend's rings) delivers all of it; one
    # that reads the store must end the stream rather than jump over what was trimmed. Never a gap.
    await publish(client, "c", [{"data": str(i)} for i in range(1, 301)])
    rest = await collect(resp, count=300)  # all 300, or [] when the stream ended
    assert [e.data for e in rest] in ([], [str(i) for i in range(1, 301)])
    info = await (await client.get("/v1/channels/c")).json()
    again = await subscribe(client, "c", last_id=first[0])
    if rest:
        # The node delivered the batch live, so it still holds it: the resume is served whole from memory.
        evs = await collect(again, count=300)
        assert [e.data for e in evs] == [str(i) for i in range(1, 301)]
    else:
        evs = await collect(again, count=info["length"] + 1)
        assert evs[0].event == "reset" and orjson.loads(evs[0].data)["reason"] == "trimmed"
        assert [e.data for e in evs[1:]] == [str(i) for i in range(301 - info["length"], 301)]
    again.close()


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(("depth", "status"), [(254, 201), (255, 400), (1023, 400), (1024, 400), (1025, 400)])
async def test_deeply_nested_data_is_stored_or_refused_clearly(
    client: Client, caplog: pytest.LogCaptureFixture, depth: int, status: int
) -> None:
    body = b'{"data":' + _nested(depth) + b"}"
    resp = await client.post(EVENTS.format("c"), data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status
    if status == 201:
        events = await collect(await subscribe(client, "c", last_id="0"), count=1)
        assert events[0].data == _nested(depth).decode()
    else:
        payload = await resp.json()
        assert payload["error"] in ("invalid_body", "invalid_json") and payload["message"]
        assert (await client.get("/v1/channels/c")).status == 404
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_integers_are_delivered_exact_or_refused(client: Client) -> None:
    # The 64-bit extremes on both sides are kept digit for digit.
    exact = "[18446744073709551615,-9223372036854775808,12345678901234567890]"
    await publish(client, "c", {"data": orjson.loads(exact)})
    [event] = await collect(await subscribe(client, "c", last_id="0"), count=1)
    assert event.data == exact
    # Beyond them a JSON parser would round to a float: 1.2345678901234568e+29 for this one. Refused instead.
    for number in ("123456789012345678901234567890", "18446744073709551616", "-9223372036854775809"):
        body = f'{{"data":{{"n":{number},"s":"{number}"}}}}'.encode()
        resp = await client.post(EVENTS.format("c"), data=body, headers={"Content-Type": "application/json"})
        assert resp.status == 400, number
        payload = await resp.json()
        assert payload["error"] == "invalid_json" and "64 bits" in payload["message"]
    # Checking the integers must not trip over nesting that orjson reads (1024 levels) and Python's parser would not.
    body = b'{"data":{"deep":' + _nested(1023) + b',"n":1' + b"0" * 25 + b"}}"
    resp = await client.post(EVENTS.format("c"), data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_json"
    # Long digit runs inside strings, and long fractions, are not integers.
    await publish(client, "c", {"data": {"s": "123456789012345678901234567890", "f": 0.12345678901234567890123}})
    assert (await (await client.get("/v1/channels/c")).json())["length"] == 2


async def test_a_generation_with_an_integer_beyond_64_bits_is_refused_as_such(client: Client) -> None:
    job = b'{"provider":"demo","messages":[{"role":"user","content":"hi"}],"params":{"max_tokens":%s}}'
    body = job % (b"1" + b"0" * 30)
    resp = await client.post("/v1/generations", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_json"


async def test_every_response_forbids_sniffing_and_framing_and_names_no_versions(client: Client) -> None:
    stream = await subscribe(client, "c")
    page = [await client.get(path) for path in ("/", "/static/app.js", "/static/style.css", "/static/nothing.js")]
    api = [
        stream,
        await client.get("/healthz"),
        await client.get("/v1/channels/nope"),
        await client.post(EVENTS.format("c"), data=b'{"data":1}', headers={"Content-Type": "application/json"}),
    ]
    for resp in page + api:
        headers = resp.headers
        assert headers["X-Content-Type-Options"] == "nosniff", resp.url
        assert headers["Referrer-Policy"] == "no-referrer", resp.url
        assert not any(c.isdigit() for c in headers.get("Server", "")), headers["Server"]
    stream.close()
    for resp in page:
        # Its own scripts only (nothing inline, nothing from elsewhere), calls to this hub alone, and no framing.
        policy = resp.headers["Content-Security-Policy"]
        assert "script-src 'self';" in policy and "connect-src 'self';" in policy and "unsafe" not in policy
        assert "frame-ancestors 'none'" in policy
