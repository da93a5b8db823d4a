"""The OpenAPI document (hub/openapi.json) against the hub: the routes it registers, and live schemathesis runs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from hub.__main__ import create_node
from hub.settings import HubSettings
from tests.conftest import ClientFactory
from tests.support import ROOT, HubProcess

OpCase = Case[APIOperation[Any, Any, Any, Any]]
DOC_PATH = ROOT / "hub" / "openapi.json"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
SUBSCRIBE = ("GET", "/v1/channels/{channel}/events")
# Not fuzzed: each valid request follows a generation to its end (a provider's retries, a demo answer at the fixture's
# slow pace) before it answers, far past a fuzzing budget. The scenario below calls it instead.
UNFUZZED = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("POST", "/v1/ai-sdk/chat")})

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
MAX_EXAMPLES = 25
# An event stream never ends: schemathesis reads one until its request timeout has passed in total (or 20 events
# came), then checks the status, the content type and the events read so far (a replayed history, a `reset`). With
# --heartbeat 1 the stream is never silent for long, so the read ends soon after the timeout.
STREAM_TIMEOUT_S = 0.3
REQUEST_TIMEOUT_S = 10.0
API_KEY = "svc-key-0123456789abcdef"
ORIGIN = "https://app.example"


def _document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DOC_PATH.read_text())
    return doc


def _operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item if method in HTTP_METHODS}


# -- the document and the app ---------------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = _document()
    assert doc["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(doc, config=schemathesis.Config.from_dict({})).validate()
    op_ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m in HTTP_METHODS]
    assert len(op_ids) == len(set(op_ids))


def test_the_document_has_every_route_the_app_registers_and_no_other() -> None:
    doc = _document()
    documented = _operations(doc)
    # The CORS middleware answers OPTIONS on every path, with no route of its own: every path documents it.
    assert {(m, p) for m, p in documented if m == "OPTIONS"} == {("OPTIONS", p) for p in doc["paths"]}
    app = create_node(HubSettings(anonymous=True))
    # aiohttp adds a HEAD route to every GET route (but the stream's); they are not documented as operations.
    registered = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD" and r.resource}
    # The demo page and its files (hub.page) are for people, not an API: the document leaves them out, and only them.
    page = {("GET", "/"), ("GET", "/static")}
    assert page <= registered
    assert registered - page == {(m, p) for m, p in documented if m != "OPTIONS"}


async def test_the_hub_serves_the_document(make_client: ClientFactory) -> None:
    client = await make_client()
    resp = await client.get("/v1/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.read()
    assert body == DOC_PATH.read_bytes()
    assert json.loads(body) == _document()


# -- live hubs ------------------------------------------------------------------------------------------------------


def _load(hub: HubProcess) -> OpenApiSchema:
    # From the hub itself, as a client would; an empty config, so no schemathesis.toml changes the run.
    return schemathesis.openapi.from_url(f"{hub.url}/v1/openapi.json", config=schemathesis.Config.from_dict({}))


def _dot_segment(case: OpCase) -> bool:
    # `.` and `..` are valid channel names, but HTTP clients (requests among them) remove such dot segments from a
    # path before sending it, so the request would reach another route. The document says to percent-encode them.
    return any(str(v) in (".", "..") for v in (case.path_parameters or {}).values())


def _fuzz(schema: OpenApiSchema) -> tuple[list[str], int]:
    """Every operation with generated valid and invalid data, and its examples. Returns the failures and the calls."""
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operation = result.ok()
        if (operation.method.upper(), operation.path) in UNFUZZED:
            continue
        timeout = STREAM_TIMEOUT_S if (operation.method.upper(), operation.path) == SUBSCRIBE else REQUEST_TIMEOUT_S
        strategies = [(mode, operation.as_strategy(generation_mode=mode)) for mode in GenerationMode]
        examples = operation.get_strategies_from_examples()
        if examples:
            strategies.append((GenerationMode.POSITIVE, st.one_of(examples)))
        for mode, strategy in strategies:
            try:
                calls += _run(strategy, timeout, failures)
            except Unsatisfiable:
                # Nothing of the operation can be made invalid (no parameters, or only free-form strings).
                if mode is not GenerationMode.NEGATIVE:
                    raise
    return failures, calls


def _run(strategy: st.SearchStrategy[OpCase], timeout: float, failures: list[str]) -> int:
    calls = 0

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same cases on every run
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # failures are collected as found, not shrunk
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy.filter(lambda case: not _dot_segment(case)))
    def check(case: OpCase) -> None:
        nonlocal calls
        calls += 1
        # Every failure is collected and reported at the end (several failed checks come as a FailureGroup, which is
        # a BaseExceptionGroup).
        try:
            case.call_and_validate(checks=CHECKS, timeout=timeout)
        except FailureGroup as e:  # its message shows the request as a curl command
            failures.append(f"{case.operation.label}: {e}")
        except Exception as e:
            failures.append(f"{case.operation.label}: {type(e).__name__}: {e}\n{case.as_curl_command()}")

    check()
    return calls


class Api:
    """Explicit requests through the document's operations: each response is checked like a fuzzed one, and must
    have the status the scenario expects (None: any the document allows)."""

    def __init__(self, schema: OpenApiSchema) -> None:
        self.schema = schema

    def __call__(
        self, method: str, path: str, status: int | None, *, timeout: float = REQUEST_TIMEOUT_S, **case: Any
    ) -> Response:
        c = self.schema[path][method].Case(**case)
        try:
            response = c.call_and_validate(checks=CHECKS, timeout=timeout)
        except (Exception, FailureGroup) as e:
            raise AssertionError(f"{method} {path}: {type(e).__name__}: {e}\n{c.as_curl_command()}") from e
        assert status is None or response.status_code == status, (
            method,
            path,
            response.status_code,
            response.content[:500],
        )
        return response


def _events(response: Response) -> list[str]:
    return [line.removeprefix("event: ") for line in response.content.decode().splitlines() if line[:6] == "event:"]


def _json(response: Response) -> Any:
    return response.json()


def _scenario(api: Api) -> None:
    """What random data rarely reaches: real generations, streams that end, resets, closed channels, limits."""
    gen = "/v1/generations"
    events = "/v1/channels/{channel}/events"
    job = {"provider": "demo", "model": "demo:3", "messages": [{"role": "user", "content": "Hi"}]}
    # The streamed answer: start, 3 tokens, done, then the response ends.
    streamed = api("POST", gen, 200, body=job, media_type="application/json", headers={"Accept": "text/event-stream"})
    assert _events(streamed) == ["start", "token", "token", "token", "done"]

    long_job = {**job, "model": "demo:1000", "channel": "scenario:gen", "params": {"temperature": 0.5, "stop": "x"}}
    accepted = _json(api("POST", gen, 202, body=long_job, media_type="application/json"))
    assert accepted["channel"] == "scenario:gen"
    generation = {"id": accepted["id"]}
    channel = {"channel": "scenario:gen"}
    # The channel exists once the worker wrote `start`; from then on it cannot take a second generation.
    for _ in _poll(10):
        if api("GET", "/v1/channels/{channel}", None, path_parameters=channel).status_code == 200:
            break
    api("POST", gen, 409, body=long_job, media_type="application/json")  # channel_exists
    api("GET", "/v1/generations/{id}", 200, path_parameters=generation)
    api("DELETE", "/v1/generations/{id}", 202, path_parameters=generation)
    for _ in _poll(10):
        record = _json(api("GET", "/v1/generations/{id}", 200, path_parameters=generation))
        if record["status"] == "cancelled":
            break
    api("DELETE", "/v1/generations/{id}", 409, path_parameters=generation)  # generation_finished

    info = _json(api("GET", "/v1/channels/{channel}", 200, path_parameters=channel))
    assert info["closed"]
    replay = api("GET", events, 200, path_parameters=channel, query={"last_event_id": "0"})
    assert _events(replay)[0] == "start"
    assert not replay.stream_cut_short  # the whole stream was checked, up to its close
    api("GET", events, 204, path_parameters=channel, headers={"Last-Event-ID": info["last_id"]})
    api("POST", events, 409, path_parameters=channel, body={"data": 1}, media_type="application/json")
    api("DELETE", "/v1/channels/{channel}", 204, path_parameters=channel)
    api("DELETE", "/v1/channels/{channel}", 404, path_parameters=channel)

    # OpenAI Chat Completions: a whole answer, the chunks, and errors in OpenAI's shape.
    chat = {"model": "demo/demo:3", "messages": [{"role": "user", "content": "Hi"}]}
    completion = _json(api("POST", "/v1/chat/completions", 200, body=chat, media_type="application/json"))
    assert completion["choices"][0]["message"]["content"] and completion["usage"]["completion_tokens"] == 3
    chunks = api("POST", "/v1/chat/completions", 200, body={**chat, "stream": True}, media_type="application/json")
    assert chunks.content.rstrip().endswith(b"data: [DONE]")
    refused = api("POST", "/v1/chat/completions", 400, body={**chat, "n": 3}, media_type="application/json")
    assert _json(refused)["error"]["code"] == "unsupported"

    # The Responses API: in the background, then its events from a sequence number, whole, and cancelled.
    ask = {"model": "demo/demo:3", "input": "Hi", "background": True}
    queued = _json(api("POST", "/v1/responses", 200, body=ask, media_type="application/json"))
    response = {"id": queued["id"]}
    replay = api(
        "GET", "/v1/responses/{id}", 200, path_parameters=response, query={"stream": "true", "starting_after": 1}
    )
    assert _events(replay)[0] == "response.output_item.added" and _events(replay)[-1] == "response.completed"
    assert _json(api("GET", "/v1/responses/{id}", 200, path_parameters=response))["status"] == "completed"
    api("POST", "/v1/responses/{id}/cancel", 200, path_parameters=response)
    api("GET", "/v1/responses/{id}", 404, path_parameters={"id": "resp_" + "0" * 24})

    # The Vercel AI SDK's chat: the UI message stream, then nothing left to resume, nothing to stop.
    ui = [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}]
    chat_stream = api("POST", "/v1/ai-sdk/chat", 200, body={"id": "c1", "messages": ui, "provider": "demo",
                      "model": "demo:3"}, media_type="application/json")  # fmt: skip
    assert chat_stream.content.rstrip().endswith(b"data: [DONE]")
    api("GET", "/v1/ai-sdk/chat/{chatId}/stream", 204, path_parameters={"chatId": "c1"})
    api("POST", "/v1/ai-sdk/chat/{chatId}/stop", 404, path_parameters={"chatId": "c1"})

    # A position the channel never had: a `reset` first, then the live stream.
    reset = api(
        "GET",
        events,
        200,
        timeout=STREAM_TIMEOUT_S,
        path_parameters={"channel": "scenario:new"},
        query={"last_event_id": "5-0"},
    )
    assert _events(reset) == ["reset"]
    closing = [{"event": "token", "data": "a"}, {"event": "done", "data": {"x": [1]}, "close": True}]
    api("POST", events, 201, path_parameters={"channel": "scenario:c"}, body=closing, media_type="application/json")
    api(
        "POST",
        events,
        400,
        path_parameters={"channel": "c"},
        body={"event": "reset", "data": 1},
        media_type="application/json",
    )
    api("POST", events, 400, path_parameters={"channel": "c"}, body=[], media_type="application/json")
    api(
        "POST",
        events,
        413,
        path_parameters={"channel": "c"},
        body={"data": "x" * 300_000},
        media_type="application/json",
    )
    big = [{"data": "x" * 200_000}] * 6
    api("POST", events, 413, path_parameters={"channel": "c"}, body=big, media_type="application/json")


def _poll(timeout_s: float) -> Iterator[None]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        yield
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s}s")


def _auth_scenario(api: Api) -> None:
    """401, 403, the three places a token may be, CORS preflights, and the publish rate, on a hub with an API key
    that may publish on `chat:*`."""
    events = "/v1/channels/{channel}/events"
    chat = {"channel": "chat:1"}
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    one: dict[str, Any] = {"body": {"data": 1}, "media_type": "application/json"}
    api("POST", events, 401, path_parameters=chat, **one)
    api("POST", events, 401, path_parameters=chat, headers={"Authorization": "Bearer not-a-key"}, **one)
    api("POST", events, 401, path_parameters=chat, headers={"Authorization": "Basic c3ZjOmtleQ=="}, **one)
    api("POST", events, 403, path_parameters={"channel": "other"}, headers=bearer, **one)
    api("POST", events, 201, path_parameters=chat, headers=bearer, **one)
    api("POST", events, 201, path_parameters=chat, query={"access_token": API_KEY}, **one)
    api("POST", events, 201, path_parameters=chat, cookies={"hub_token": API_KEY}, **one)
    # API keys publish; they may not read.
    api("GET", "/v1/channels/{channel}", 403, path_parameters=chat, headers=bearer)
    api("GET", events, 403, path_parameters=chat, query={"access_token": API_KEY})
    api("GET", events, 401, path_parameters=chat)

    gen = "/v1/generations"
    job = {"provider": "demo", "model": "demo:1", "messages": [{"role": "user", "content": "Hi"}]}
    api("POST", gen, 401, body=job, media_type="application/json")
    api("POST", gen, 403, body={**job, "channel": "other"}, headers=bearer, media_type="application/json")
    created = api("POST", gen, 202, body={**job, "channel": "chat:gen"}, headers=bearer, media_type="application/json")
    generation = {"id": _json(created)["id"]}
    api("GET", "/v1/generations/{id}", 401, path_parameters=generation)
    api("GET", "/v1/generations/{id}", 200, path_parameters=generation, headers=bearer)
    api("DELETE", "/v1/generations/{id}", 401, path_parameters=generation)
    api("DELETE", "/v1/channels/{channel}", 204, path_parameters=chat, cookies={"hub_token": API_KEY})

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    api("OPTIONS", events, 204, path_parameters=chat, headers={"Origin": ORIGIN, **preflight})
    api("OPTIONS", "/healthz", 204, headers={"Origin": ORIGIN})
    api("OPTIONS", events, 403, path_parameters=chat, headers={"Origin": "https://elsewhere.example", **preflight})
    api("GET", "/healthz", 200, headers={"Origin": ORIGIN})

    # The bucket holds --publish-burst (1000) events and refills at --publish-rate (10/s here): a second large batch
    # at once is over the rate. A batch over --max-batch (1000) is refused before anything is charged.
    batch = [{"data": i} for i in range(900)]
    api("POST", events, 201, path_parameters=chat, headers=bearer, body=batch, media_type="application/json")
    api("POST", events, 429, path_parameters=chat, headers=bearer, body=batch, media_type="application/json")
    over = [{"data": i} for i in range(1001)]
    api("POST", events, 413, path_parameters=chat, headers=bearer, body=over, media_type="application/json")


def _hub(*args: str, env: dict[str, str] | None = None) -> HubProcess:
    # The embedded worker runs what the fuzzing starts: providers other than the demo one get no key of the
    # developer's environment, and an address where nothing listens, so no request leaves the machine.
    nowhere = "http://127.0.0.1:9"
    providers = {
        "OPENAI_API_KEY": "",
        "OPENAI_BASE_URL": f"{nowhere}/v1",
        "ANTHROPIC_API_KEY": "",
        "ANTHROPIC_BASE_URL": nowhere,
        "GEMINI_API_KEY": "",
        "GEMINI_BASE_URL": nowhere,
    }
    return HubProcess("--heartbeat", "1", *args, env={**providers, **(env or {})})


@pytest.fixture
def hub() -> Iterator[HubProcess]:
    # A slow demo pace keeps the cancelled generation of the scenario short enough to be read whole. The fuzzing
    # starts many generations that are still running when the scenario begins: no per-client cap on them here.
    hub = _hub("--max-generations-per-client", "0", env={"PRODUCER_DEMO_TOKENS_PER_S": "5"})
    hub.start()
    try:
        yield hub
    finally:
        print(hub.log()[-4000:])  # shown when the test fails
        hub.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_live_hub_conforms_to_the_document(hub: HubProcess) -> None:
    started = time.monotonic()
    schema = _load(hub)
    failures, calls = _fuzz(schema)
    elapsed = time.monotonic() - started
    report = "\n\n".join(failures[:10])
    assert not failures, f"{len(failures)} of {calls} calls failed ({elapsed:.1f}s):\n\n{report}"
    _scenario(Api(schema))
    assert "Traceback" not in hub.log()


@pytest.mark.e2e
def test_a_hub_with_authentication_and_cors_conforms_to_the_document() -> None:
    hub = _hub(
        "--publish-rate",
        "10",
        env={"HUB_ANONYMOUS": "", "HUB_API_KEYS": f"svc {API_KEY} chat:*", "HUB_CORS_ORIGINS": ORIGIN},
    )
    hub.start()
    try:
        _auth_scenario(Api(_load(hub)))
        assert "Traceback" not in hub.log()
    finally:
        print(hub.log()[-4000:])
        hub.close()
