"""Hostile input against a live hub process: arbitrary bodies, names, ids and data (Hypothesis) get a 2xx or a clear
JSON 4xx, never a 5xx, change nothing when refused, and can never forge an event."""

from __future__ import annotations

import http.client
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.channels import channel_ok
from ssecore.sse import SSEEvent, SSEParser
from tests.support import HubProcess

pytestmark = pytest.mark.e2e

# Everything JSON can hold, nested a little.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Text a publisher may send as data: anything but lone surrogates (not UTF-8 at all), with line ends weighted in.
data_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300) | st.lists(
    st.sampled_from(["\r", "\n", "\r\n", "\x00", "data: x", "event: reset", "id: 1-1", ":", " ", "é", "🌍"]),
    max_size=30,
).map("".join)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def hub() -> Iterator[HubProcess]:
    node = HubProcess(
        "--publish-rate",
        "100000",
        "--publish-burst",
        "100000",
        "--publish-bytes-rate",
        str(1 << 30),
        "--publish-bytes-burst",
        str(1 << 30),
        "--max-batch",
        "1000",
        "--max-streams-per-client",
        "10000",
        "--log-level",
        "warning",
    )
    node.start()
    yield node
    node.close()


def request(
    hub: HubProcess, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        # A stream never ends: its status and headers are the answer here.
        payload = b"" if resp.headers.get("Content-Type") == "text/event-stream" else resp.read()
        return resp.status, dict(resp.headers), payload
    finally:
        conn.close()


def publish(hub: HubProcess, channel: str, body: Any) -> tuple[int, Any]:
    status, _, payload = request(
        hub,
        "POST",
        f"/v1/channels/{quote(channel, safe='')}/events",
        orjson.dumps(body),
        {"Content-Type": "application/json"},
    )
    return status, orjson.loads(payload)


def info(hub: HubProcess, channel: str) -> Any:
    status, _, payload = request(hub, "GET", f"/v1/channels/{quote(channel, safe='')}")
    return orjson.loads(payload) if status == 200 else None


def assert_clear(status: int, headers: dict[str, str], payload: bytes) -> None:
    assert status < 500, (status, payload[:200])
    if status >= 400:
        assert headers["Content-Type"].startswith("application/json")
        body = json.loads(payload)
        assert isinstance(body["error"], str) and isinstance(body["message"], str) and body["message"]


@FUZZ
@given(body=json_values)
def test_any_json_body_is_accepted_or_refused_clearly_and_a_refusal_changes_nothing(hub: HubProcess, body: Any) -> None:
    before = info(hub, "fuzz-body")
    status, _, payload = request(
        hub, "POST", "/v1/channels/fuzz-body/events", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    assert status in (201, 400, 413), (status, payload[:200])
    if status != 201:
        assert_clear(status, {"Content-Type": "application/json"}, payload)
        assert info(hub, "fuzz-body") == before


@FUZZ
@given(raw=st.binary(max_size=200), content_type=st.sampled_from(["application/json", "text/plain", "", "x/y"]))
def test_any_bytes_with_any_content_type_never_make_a_5xx(hub: HubProcess, raw: bytes, content_type: str) -> None:
    status, headers, payload = request(
        hub, "POST", "/v1/channels/fuzz-raw/events", raw, {"Content-Type": content_type} if content_type else {}
    )
    assert_clear(status, headers, payload)


@FUZZ
@given(name=st.text(max_size=220))
def test_any_channel_name_is_served_or_refused_clearly(hub: HubProcess, name: str) -> None:
    path = quote(name, safe="")
    for method, body in (("POST", b'{"data":1}'), ("GET", None), ("DELETE", None)):
        status, headers, payload = request(
            hub,
            method,
            f"/v1/channels/{path}" + ("/events" if body else ""),
            body,
            {"Content-Type": "application/json"},
        )
        assert_clear(status, headers, payload)
        if not channel_ok(name):
            assert status in (400, 404, 405), (name, status)


@FUZZ
@given(last_id=header_text, query=header_text)
def test_any_resume_position_is_honoured_or_refused_clearly(hub: HubProcess, last_id: str, query: str) -> None:
    publish(hub, "fuzz-resume", {"data": "x"})
    status, headers, payload = request(
        hub,
        "GET",
        f"/v1/channels/fuzz-resume/events?last_event_id={quote(query)}",
        headers={"Last-Event-ID": last_id} if last_id else {},
    )
    assert status in (200, 204, 400), status
    assert_clear(status, headers, payload)


def read_events(hub: HubProcess, path: str, count: int) -> list[SSEEvent]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        parser = SSEParser()
        events: list[SSEEvent] = []
        while len(events) < count:
            line = resp.readline()
            if not line:
                break
            events += parser.feed(line)
        return events
    except TimeoutError:
        return events
    finally:
        conn.close()


@FUZZ
@given(data=data_text, name=st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True).filter(lambda n: n != "reset"))
def test_no_publisher_can_forge_or_split_an_event(hub: HubProcess, data: str, name: str) -> None:
    status, before = publish(hub, "fuzz-sse", {"event": "mark", "data": "m"})
    assert status == 201
    status, published = publish(hub, "fuzz-sse", {"event": name, "data": data})
    assert status == 201
    events = read_events(hub, f"/v1/channels/fuzz-sse/events?last_event_id={before['ids'][0]}", 1)
    # Exactly the published event: its id, its name, and its data (SSE carries line breaks, not their kind).
    assert len(events) == 1
    expected = data.replace("\r\n", "\n").replace("\r", "\n")
    assert (events[0].id, events[0].event, events[0].data) == (published["ids"][0], name, expected)


@FUZZ
@given(path=st.text(alphabet=st.sampled_from(list("/.%2fF5cC.:@-_aZ09")), max_size=60))
def test_path_tricks_never_reach_another_channel_or_a_5xx(hub: HubProcess, path: str) -> None:
    status, headers, payload = request(hub, "GET", "/v1/channels/" + path)
    assert_clear(status, headers, payload)
    for trick in ("..", "%2e%2e", "%2f", "/", "%5c"):
        if trick in path.lower() and status == 200:
            raise AssertionError(f"{path!r} was served")


@pytest.mark.parametrize("name", [".", "..", "%2E", "%2e%2E", "a..b", "..%2F..", "%2F", "a%2Fb"])
def test_dot_and_slash_channel_names_are_refused(hub: HubProcess, name: str) -> None:
    # http.client sends the path as written: what a hostile client would send, not what a browser normalizes.
    for method, suffix, body in (("GET", "/events", None), ("POST", "/events", b'{"data":1}'), ("GET", "", None)):
        status, headers, payload = request(
            hub, method, f"/v1/channels/{name}{suffix}", body, {"Content-Type": "application/json"}
        )
        assert status in (400, 404), (name, method, suffix, status)
        assert_clear(status, headers, payload)


# Requests no HTTP parser accepts: a byte that is not UTF-8 in the query (where a token goes), a method that is not
# one, a header without a colon, an endless header line, a bad chunk size, and garbage after a good request.
MALFORMED = [
    b"GET /v1/channels/c/events?access_token=s3cret\xff HTTP/1.1\r\nHost: hub\r\n\r\n",
    b"GARBAGE\x00 / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: hub\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
    b"POST /v1/channels/c/events HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\nGARBAGE\x00 / HTTP/1.1\r\n\r\n",
]


def send_raw(hub: HubProcess, raw: bytes) -> bytes:
    """Send bytes as they are and return what the hub answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as s:
        s.sendall(raw)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def wait_log(hub: HubProcess, pattern: str, count: int, timeout_s: float = 10) -> str:
    """The hub's log once `pattern` occurs in it `count` times (a process writes its log when it gets to it)."""
    deadline = time.monotonic() + timeout_s
    while (log := hub.log()).count(pattern) < count:
        assert time.monotonic() < deadline, f"{pattern!r} not {count} times in the log:\n{log[-3000:]}"
        time.sleep(0.05)
    return log


@pytest.fixture(scope="module")
def debug_hub() -> Iterator[HubProcess]:
    node = HubProcess("--log-level", "debug")
    node.start()
    yield node
    node.close()


def test_malformed_requests_are_not_logged_as_errors(hub: HubProcess) -> None:
    for raw in MALFORMED:
        assert b"HTTP/1.0 400 Bad Request" in send_raw(hub, raw)
    # Each was answered, and logged (or not) before its answer: the log holds all it will hold about them.
    log = hub.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_a_malformed_request_is_one_debug_line_without_the_request(debug_hub: HubProcess) -> None:
    before = debug_hub.log().count("malformed request from")
    for raw in MALFORMED:
        assert b"HTTP/1.0 400 Bad Request" in send_raw(debug_hub, raw)
    log = wait_log(debug_hub, "malformed request from", before + len(MALFORMED))
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert "s3cret" not in log
    lines = [line for line in log.splitlines() if "malformed request from" in line]
    assert all(" DEBUG hub.http: malformed request from 127.0.0.1: " in line for line in lines), lines


@pytest.mark.parametrize("name", ["access_token", "access%5Ftoken"])
def test_a_token_in_the_query_never_reaches_the_access_log(debug_hub: HubProcess, name: str) -> None:
    secret, channel = f"tok{uuid.uuid4().hex}", f"none-{uuid.uuid4().hex}"
    status, _, _ = request(debug_hub, "GET", f"/v1/channels/{channel}?{name}={secret}&x=1")
    assert status == 404
    log = wait_log(debug_hub, f'"GET /v1/channels/{channel}?access_token=***&x=1 HTTP/1.1" 404', 1)
    assert secret not in log
