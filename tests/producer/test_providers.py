"""The three providers against the fake provider server: request mapping, stream decoding, errors, cancellation."""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from producer.providers._http import clean_message, retry_after_s
from producer.providers.anthropic import AnthropicProvider
from producer.providers.anthropic import _Decoder as AnthropicDecoder
from producer.providers.base import (
    Finish,
    GenerationRequest,
    Provider,
    ProviderConfig,
    ProviderError,
    ReasoningDelta,
    RefusalDelta,
    StreamItem,
    TextDelta,
)
from producer.providers.gemini import GeminiProvider
from producer.providers.gemini import _Decoder as GeminiDecoder
from producer.providers.openai import OpenAIProvider
from producer.providers.openai import _Decoder as OpenAIDecoder
from ssecore.sse import SSEEvent
from tests.producer.fake_providers import (
    DEFAULT_TOKENS,
    TEST_API_KEY,
    Behaviour,
    FakeProviders,
    ProviderName,
)
from tests.support import free_port

ALL: list[ProviderName] = ["openai", "anthropic", "gemini"]
ProviderClass = Callable[[ProviderConfig], OpenAIProvider | AnthropicProvider | GeminiProvider]
CLASSES: dict[ProviderName, ProviderClass] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
}
HELLO = "".join(DEFAULT_TOKENS)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Say hello again"},
]


def make(fake: FakeProviders, name: ProviderName, **config: Any) -> OpenAIProvider | AnthropicProvider | GeminiProvider:
    return CLASSES[name](fake.config(name, **config))


def ask(model: str, **params: Any) -> GenerationRequest:
    return GenerationRequest(model=model, messages=MESSAGES, **params)


async def collect(provider: Provider, session: aiohttp.ClientSession, request: GenerationRequest) -> tuple[str, Finish]:
    """Run a stream to its end, checking the contract: non-empty text deltas, then exactly one Finish, last."""
    items: list[StreamItem] = [item async for item in provider.stream(session, request)]
    assert items, "a stream yields at least its Finish"
    *deltas, finish = items
    assert isinstance(finish, Finish)
    assert all(isinstance(d, TextDelta) and d.text for d in deltas)
    return "".join(d.text for d in deltas if isinstance(d, TextDelta)), finish


async def failure(
    provider: Provider, session: aiohttp.ClientSession, request: GenerationRequest
) -> tuple[list[str], ProviderError]:
    """Run a stream that must fail; returns the text that came before the error, and the error."""
    texts: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(session, request):
            assert isinstance(item, TextDelta), f"no Finish may precede a failure, got {item}"
            texts.append(item.text)
    return texts, info.value


def test_the_provider_classes_satisfy_the_protocol() -> None:
    providers: list[Provider] = [OpenAIProvider(ProviderConfig()), AnthropicProvider(ProviderConfig())]
    providers.append(GeminiProvider(ProviderConfig()))
    assert [p.name for p in providers] == ["openai", "anthropic", "gemini"]


# --- normal streams -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
async def test_streams_text_then_one_finish_with_usage(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    text, finish = await collect(make(fake, name), session, ask("normal"))
    assert text == HELLO
    # Anthropic always reports the prompt-cache read (0 here); the fake's other wires report no cache at all.
    cached = 0 if name == "anthropic" else None
    assert finish == Finish("stop", input_tokens=9, output_tokens=len(DEFAULT_TOKENS), cached_input_tokens=cached)


@pytest.mark.parametrize("name", ALL)
async def test_length_finish_reason_is_normalized(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    _, finish = await collect(make(fake, name), session, ask("length"))
    assert finish.finish_reason == "length"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("sent", "expected"), [("content_filter", "content_filter"), ("tool_calls", "tool_calls")])
async def test_other_finish_reasons_are_normalized(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName, sent: str, expected: str
) -> None:
    if name == "gemini" and sent == "tool_calls":
        sent, expected = "malformed_function_call", "malformed_function_call"  # no equivalent: lower-cased
    fake.behaviours["reason"] = Behaviour(finish_reason=sent)
    _, finish = await collect(make(fake, name), session, ask("reason"))
    assert finish.finish_reason == expected


@pytest.mark.parametrize("name", ["openai", "gemini"])
async def test_missing_usage_gives_none_token_counts(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    text, finish = await collect(make(fake, name), session, ask("no-usage"))
    assert text == HELLO
    assert finish == Finish("stop", None, None)


async def test_openai_stream_without_done_but_with_finish_reason_still_finishes(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    text, finish = await collect(make(fake, "openai"), session, ask("no-done"))
    assert (text, finish) == (HELLO, Finish("stop", 9, len(DEFAULT_TOKENS)))


@pytest.mark.parametrize("name", ALL)
async def test_multibyte_character_split_across_reads_arrives_intact(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    text, _ = await collect(make(fake, name), session, ask("split-utf8"))
    assert text == "héllo wörld 🌍!"


@pytest.mark.parametrize("name", ALL)
async def test_slow_first_token_within_the_read_timeout_is_waited_for(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    text, _ = await collect(make(fake, name, read_timeout_s=5.0), session, ask("slow-first"))
    assert text == HELLO


@pytest.mark.parametrize("name", ALL)
async def test_a_consumer_that_stops_at_finish_does_not_hold_the_connection(
    fake: FakeProviders, name: ProviderName
) -> None:
    # One connection in the pool: if the first stream still held it, the second could not start.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        provider = make(fake, name)
        first = provider.stream(session, ask("normal"))
        try:
            while not isinstance(await anext(first), Finish):
                pass
            text, _ = await asyncio.wait_for(collect(provider, session, ask("normal")), 5.0)
            assert text == HELLO
        finally:
            await first.aclose()


async def test_the_fake_server_also_mounts_on_pytest_aiohttp(aiohttp_server: AiohttpServer) -> None:
    fake = FakeProviders()
    server = await aiohttp_server(fake.app)
    fake.root = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        text, _ = await collect(make(fake, "anthropic"), session, ask("normal"))
    assert text == HELLO


# --- request mapping ------------------------------------------------------------------------------------------------


async def test_openai_request_carries_bearer_key_stream_options_and_set_params(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    provider = make(fake, "openai", extra_headers={"OpenAI-Organization": "org-1"})
    await collect(provider, session, ask("normal", max_tokens=50, temperature=0.5, top_p=0.9, stop=["\n\n"]))
    (req,) = fake.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == f"Bearer {TEST_API_KEY}"
    assert req.headers["openai-organization"] == "org-1"
    assert req.headers["content-type"] == "application/json"
    assert req.body == {
        "model": "normal",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Reasoning models (o-series, GPT-5) refuse `max_tokens`.
        "max_completion_tokens": 50,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n\n"],
    }


async def test_openai_request_leaves_out_unset_params_and_absent_key(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    await collect(make(fake, "openai", api_key=None), session, ask("normal"))
    (req,) = fake.requests
    assert "authorization" not in req.headers
    assert set(req.body) == {"model", "messages", "stream", "stream_options"}


async def test_openai_base_url_with_trailing_slash_is_joined_once(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    await collect(make(fake, "openai", base_url=fake.base_url("openai") + "/"), session, ask("normal"))
    assert fake.requests[0].path == "/v1/chat/completions"


async def test_anthropic_request_moves_system_to_top_level_and_maps_params(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    messages = [{"role": "system", "content": "One."}, *MESSAGES]
    request = GenerationRequest("normal", messages, max_tokens=64, temperature=0.2, top_p=0.8, stop=["END"])
    await collect(make(fake, "anthropic"), session, request)
    (req,) = fake.requests
    assert (req.method, req.path) == ("POST", "/v1/messages")
    assert req.headers["x-api-key"] == TEST_API_KEY
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in req.headers
    assert req.body == {
        "model": "normal",
        "system": "One.\n\nBe brief.",
        "messages": [m for m in MESSAGES if m["role"] != "system"],
        "max_tokens": 64,
        "stream": True,
        "temperature": 0.2,
        "top_p": 0.8,
        "stop_sequences": ["END"],
    }


async def test_anthropic_request_gets_default_max_tokens_and_no_optional_fields(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    request = GenerationRequest("normal", [{"role": "user", "content": "Hi"}])
    await collect(make(fake, "anthropic"), session, request)
    assert fake.requests[0].body == {
        "model": "normal",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1024,
        "stream": True,
    }


async def test_gemini_request_uses_sse_endpoint_roles_system_instruction_and_generation_config(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    await collect(make(fake, "gemini"), session, ask("normal", max_tokens=32, temperature=1.0, top_p=0.5, stop=["x"]))
    (req,) = fake.requests
    assert (req.method, req.path, req.query) == ("POST", "/v1beta/models/normal:streamGenerateContent", {"alt": "sse"})
    assert req.headers["x-goog-api-key"] == TEST_API_KEY
    assert "key" not in req.query
    assert req.body == {
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello!"}]},
            {"role": "user", "parts": [{"text": "Say hello again"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"maxOutputTokens": 32, "temperature": 1.0, "topP": 0.5, "stopSequences": ["x"]},
    }


async def test_gemini_request_without_params_has_no_generation_config(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    await collect(make(fake, "gemini"), session, GenerationRequest("models/normal", [{"role": "user", "content": "a"}]))
    (req,) = fake.requests
    assert req.path == "/v1beta/models/normal:streamGenerateContent"
    assert req.body == {"contents": [{"role": "user", "parts": [{"text": "a"}]}]}


# --- HTTP errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
async def test_rate_limit_gives_retry_hint_and_the_next_attempt_succeeds(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    provider = make(fake, name)
    texts, error = await failure(provider, session, ask("retry-once"))
    assert texts == []
    assert (error.code, error.status, error.retryable, error.after_s) == ("rate_limited", 429, True, 2.0)
    text, _ = await collect(provider, session, ask("retry-once"))
    assert text == HELLO
    assert [r.attempt for r in fake.requests] == [1, 2]


@pytest.mark.parametrize("name", ALL)
async def test_spent_quota_is_not_retryable(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    _, error = await failure(make(fake, name), session, ask("quota"))
    assert (error.code, error.retryable, error.after_s) == ("quota_exhausted", False, None)
    assert error.status == (400 if name == "anthropic" else 429)


async def test_gemini_per_minute_quota_is_retryable_after_the_retry_info_delay(
    fake: FakeProviders, session: aiohttp.ClientSession
) -> None:
    fake.behaviours["rpm"] = Behaviour(reject="rate_limit", retry_after="17.5")
    _, error = await failure(make(fake, "gemini"), session, ask("rpm"))
    assert (error.code, error.retryable, error.after_s) == ("rate_limited", True, 17.5)


@pytest.mark.parametrize("name", ALL)
async def test_bad_key_is_an_auth_error_whose_message_hides_the_key(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    _, error = await failure(make(fake, name), session, ask("auth"))
    assert (error.code, error.retryable) == ("auth", False)
    assert TEST_API_KEY not in str(error)
    assert TEST_API_KEY not in error.message


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("model", "status"), [("bad-request", 400), ("not-found", 404)])
async def test_bad_requests_are_not_retryable(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName, model: str, status: int
) -> None:
    _, error = await failure(make(fake, name), session, ask(model))
    assert (error.code, error.status, error.retryable) == ("bad_request", status, False)
    assert error.message.startswith(f"HTTP {status}: ")


@pytest.mark.parametrize(
    ("name", "code", "status", "after_s"),
    [("openai", "server_error", 503, 1.0), ("anthropic", "overloaded", 529, 1.0), ("gemini", "overloaded", 503, None)],
)
async def test_overload_is_retryable(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName, code: str, status: int, after_s: float
) -> None:
    _, error = await failure(make(fake, name), session, ask("overloaded"))
    assert (error.code, error.status, error.retryable, error.after_s) == (code, status, True, after_s)


@pytest.mark.parametrize("name", ALL)
async def test_server_error_is_retryable(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    _, error = await failure(make(fake, name), session, ask("server-error"))
    assert (error.code, error.status, error.retryable) == ("server_error", 500, True)


@pytest.mark.parametrize("name", ALL)
async def test_an_html_error_page_gives_a_short_message(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    _, error = await failure(make(fake, name), session, ask("html"))
    assert (error.code, error.status, error.retryable) == ("server_error", 502, True)
    assert error.message == "HTTP 502"


async def test_a_session_that_raises_for_status_still_gets_the_provider_error(fake: FakeProviders) -> None:
    async with aiohttp.ClientSession(raise_for_status=True) as session:
        _, error = await failure(make(fake, "openai"), session, ask("quota"))
    assert error.code == "quota_exhausted"


# --- broken streams -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
async def test_stream_cut_midway_is_truncated_and_retryable(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    texts, error = await failure(make(fake, name), session, ask("cut"))
    assert "".join(texts) == "".join(DEFAULT_TOKENS[:2])
    assert (error.code, error.retryable) == ("stream_truncated", True)


@pytest.mark.parametrize("name", ALL)
async def test_stream_cut_after_all_text_but_before_the_end_marker_is_truncated(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    texts, error = await failure(make(fake, name), session, ask("cut-at-end"))
    assert "".join(texts) == HELLO
    assert error.code == "stream_truncated"


@pytest.mark.parametrize("name", ALL)
async def test_stream_ending_cleanly_without_end_marker_is_truncated(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    # Not a dropped connection: the body ends properly, but the provider never said the answer was complete.
    texts, error = await failure(make(fake, name), session, ask("end-early"))
    assert "".join(texts) == "".join(DEFAULT_TOKENS[:3])
    assert (error.code, error.retryable) == ("stream_truncated", True)


@pytest.mark.parametrize("name", ALL)
async def test_malformed_chunk_is_a_bad_response(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    texts, error = await failure(make(fake, name), session, ask("malformed"))
    assert texts == [DEFAULT_TOKENS[0]]
    assert (error.code, error.retryable) == ("bad_response", False)


@pytest.mark.parametrize(
    ("name", "code"), [("openai", "server_error"), ("anthropic", "overloaded"), ("gemini", "overloaded")]
)
async def test_error_inside_a_200_stream_is_raised_after_the_text_so_far(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName, code: str
) -> None:
    texts, error = await failure(make(fake, name), session, ask("stream-error"))
    assert "".join(texts) == "".join(DEFAULT_TOKENS[:2])
    assert (error.code, error.retryable) == (code, True)


@pytest.mark.parametrize("name", ALL)
async def test_silence_longer_than_the_read_timeout_after_the_first_output_is_a_timeout(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    fake.behaviours["stalls"] = Behaviour(tokens=("first ", "second"), pace_s=0.5)
    texts, error = await failure(make(fake, name, read_timeout_s=0.1), session, ask("stalls"))
    assert texts == ["first "]
    assert (error.code, error.retryable, error.accepted) == ("timeout", True, True)


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_a_head_without_output_waits_for_the_first_byte_timeout_not_the_read_timeout(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    """These two send bytes that say nothing at once (a role chunk; message_start and pings), then think."""
    text, _ = await collect(make(fake, name, read_timeout_s=0.1, first_byte_timeout_s=5), session, ask("slow-first"))
    assert text == HELLO
    texts, error = await failure(
        make(fake, name, read_timeout_s=30, first_byte_timeout_s=0.2), session, ask("slow-first")
    )
    assert texts == [] and (error.code, error.retryable, error.accepted) == ("timeout", False, True)


@pytest.mark.parametrize("name", ALL)
async def test_a_model_that_thinks_before_its_first_byte_has_the_first_byte_timeout(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    """A reasoning model may be silent for minutes before anything: that wait has its own, longer, bound."""
    fake.behaviours["thinker"] = Behaviour(head_delay_s=0.5)
    fake.behaviours["mute"] = Behaviour(head_delay_s=3)
    patient = make(fake, name, read_timeout_s=0.1, first_byte_timeout_s=5)
    text, _ = await collect(patient, session, ask("thinker"))
    assert text == HELLO
    # Past the first-byte timeout it ends, and is not tried again: the provider may be working on it, and billing.
    started = asyncio.get_running_loop().time()
    texts, error = await failure(make(fake, name, read_timeout_s=30, first_byte_timeout_s=0.3), session, ask("mute"))
    assert texts == [] and (error.code, error.retryable) == ("timeout", False) and "first-byte" in error.message
    assert asyncio.get_running_loop().time() - started < 2.5


@pytest.mark.parametrize("name", ALL)
async def test_nothing_listening_is_a_retryable_connection_error(
    session: aiohttp.ClientSession, name: ProviderName
) -> None:
    base = f"http://127.0.0.1:{free_port()}" + ("/v1" if name == "openai" else "")
    provider = CLASSES[name](ProviderConfig(api_key=TEST_API_KEY, base_url=base, connect_timeout_s=2.0))
    _, error = await failure(provider, session, ask("normal"))
    assert (error.code, error.retryable) == ("connection", True)
    assert TEST_API_KEY not in error.message


# --- cancellation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
async def test_closing_the_stream_midway_closes_the_connection(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    stream = make(fake, name).stream(session, ask("slow"))
    received = [await anext(stream), await anext(stream)]
    assert received == [TextDelta("t0 "), TextDelta("t1 ")]
    await stream.aclose()
    (req,) = fake.requests
    await asyncio.wait_for(req.disconnected.wait(), 2.0)
    assert not req.completed


@pytest.mark.parametrize("name", ALL)
async def test_cancelling_the_consuming_task_closes_the_connection(
    fake: FakeProviders, session: aiohttp.ClientSession, name: ProviderName
) -> None:
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in make(fake, name).stream(session, ask("slow")):
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (req,) = fake.requests
    await asyncio.wait_for(req.disconnected.wait(), 2.0)
    assert not req.completed


async def test_a_json_answer_to_a_streaming_request_is_a_bad_response(aiohttp_server: AiohttpServer) -> None:
    # Some compatible servers answer 200 with one JSON document (an error, or a non-streamed completion).
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"error": "model 'x' is not loaded"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    provider = OpenAIProvider(ProviderConfig(base_url=str(server.make_url("/v1"))))
    async with aiohttp.ClientSession() as session:
        _, error = await failure(provider, session, ask("x"))
    assert (error.code, error.status, error.retryable) == ("bad_response", 200, False)
    assert "model 'x' is not loaded" in error.message


# --- decoders, on events the fake server does not send ---------------------------------------------------------------


def feed_all(decoder: OpenAIDecoder | AnthropicDecoder | GeminiDecoder, *events: SSEEvent) -> list[StreamItem]:
    return [item for event in events for item in decoder.feed(event)]


def test_anthropic_input_tokens_include_cached_prompt_tokens() -> None:
    usage = {"input_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 1}
    decoder = AnthropicDecoder(None)
    items = feed_all(
        decoder,
        SSEEvent(f'{{"type": "message_start", "message": {{"usage": {_json(usage)}}}}}', "message_start"),
        SSEEvent('{"type": "message_delta", "delta": {"stop_reason": "refusal"}, "usage": {"output_tokens": 3}}'),
        SSEEvent('{"type": "message_stop"}', "message_stop"),
    )
    assert items == [Finish("content_filter", input_tokens=1105, output_tokens=3, cached_input_tokens=1000)]


def test_anthropic_thinking_is_reasoning_and_unknown_deltas_are_nothing() -> None:
    decoder = AnthropicDecoder(None)
    thinking = '{"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "hmm"}}'
    signature = '{"type": "content_block_delta", "delta": {"type": "signature_delta", "signature": "EqQB"}}'
    text = '{"type": "content_block_delta", "delta": {"type": "text_delta", "text": "ok"}}'
    events = (SSEEvent(e, "content_block_delta") for e in (thinking, signature, text))
    assert feed_all(decoder, *events) == [ReasoningDelta("hmm"), TextDelta("ok")]


def test_gemini_thought_parts_are_reasoning_and_thinking_tokens_count_as_output() -> None:
    chunk = {
        "candidates": [
            {"content": {"parts": [{"text": "plan", "thought": True}, {"text": "answer"}]}, "finishReason": "STOP"}
        ],
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2, "thoughtsTokenCount": 30},
    }
    items = feed_all(GeminiDecoder(None), SSEEvent(_json(chunk)))
    assert items == [ReasoningDelta("plan"), TextDelta("answer"), Finish("stop", 4, 32, reasoning_tokens=30)]


def test_openai_compatible_reasoning_and_refusal_deltas_are_their_own_items() -> None:
    decoder = OpenAIDecoder(None)
    items = feed_all(
        decoder,
        SSEEvent('{"choices": [{"delta": {"role": "assistant", "content": "", "reasoning_content": "Let me"}}]}'),
        SSEEvent('{"choices": [{"delta": {"reasoning": " think."}}]}'),
        SSEEvent('{"choices": [{"delta": {"refusal": "I can\'t help with that."}}]}'),
        SSEEvent('{"choices": [{"delta": {"content": "Hi"}, "finish_reason": "stop"}]}'),
        SSEEvent("[DONE]"),
    )
    assert items == [
        ReasoningDelta("Let me"),
        ReasoningDelta(" think."),
        RefusalDelta("I can't help with that."),
        TextDelta("Hi"),
        Finish("stop"),
    ]


def test_gemini_blocked_prompt_finishes_as_content_filter() -> None:
    decoder = GeminiDecoder(None)
    chunk = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4}}
    assert feed_all(decoder, SSEEvent(_json(chunk))) == [Finish("content_filter", 4, None)]


def test_openai_reads_groq_usage_and_skips_empty_content() -> None:
    decoder = OpenAIDecoder(None)
    items = feed_all(
        decoder,
        SSEEvent('{"choices": [{"delta": {"role": "assistant", "content": null}}]}'),
        SSEEvent('{"choices": [{"delta": {"content": "hi"}, "finish_reason": "function_call"}]}'),
        SSEEvent('{"choices": [], "x_groq": {"usage": {"prompt_tokens": 3, "completion_tokens": 1}}}'),
        SSEEvent("[DONE]"),
    )
    assert items == [TextDelta("hi"), Finish("tool_calls", 3, 1)]


def test_openai_quota_error_inside_the_stream_is_not_retryable() -> None:
    event = SSEEvent('{"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}}')
    with pytest.raises(ProviderError) as info:
        OpenAIDecoder(None).feed(event)
    assert (info.value.code, info.value.retryable) == ("quota_exhausted", False)


@pytest.mark.parametrize(
    "chunk",
    [
        # vLLM: the error object itself, as a chunk.
        '{"object": "error", "message": "out of memory", "type": "InternalServerError", "code": 500}',
        # A failed generation's last chunk.
        '{"choices": [{"delta": {"content": ""}, "finish_reason": "error"}]}',
    ],
)
def test_openai_errors_inside_the_stream_end_the_answer_as_an_error_not_done(chunk: str) -> None:
    decoder = OpenAIDecoder(None)
    assert feed_all(decoder, SSEEvent('{"choices": [{"delta": {"content": "Hel"}}]}')) == [TextDelta("Hel")]
    with pytest.raises(ProviderError) as info:
        feed_all(decoder, SSEEvent(chunk), SSEEvent("[DONE]"))
    assert info.value.code == "provider_error" and not info.value.retryable


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


# --- helpers --------------------------------------------------------------------------------------------------------


def test_retry_after_reads_seconds_dates_and_milliseconds() -> None:
    now = 1_700_000_000.0
    assert retry_after_s({"retry-after": "7"}, now=now) == 7.0
    assert retry_after_s({"retry-after": "1.5"}, now=now) == 1.5
    assert retry_after_s({"retry-after": email.utils.formatdate(now + 30, usegmt=True)}, now=now) == 30.0
    assert retry_after_s({"retry-after": email.utils.formatdate(now - 30, usegmt=True)}, now=now) == 0.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}, now=now) == 0.25
    assert retry_after_s({"retry-after": "soon"}, now=now) is None
    assert retry_after_s({"retry-after": "-3"}, now=now) is None
    assert retry_after_s({}, now=now) is None


def test_messages_are_redacted_flattened_and_bounded() -> None:
    assert clean_message("bad key my-secret-key here", "my-secret-key") == "bad key [redacted] here"
    assert clean_message("Incorrect API key provided: sk-proj-abc123****wxyz.", None) == (
        "Incorrect API key provided: [redacted]"
    )
    assert clean_message("key AIzaSyA1234567890abcdefghijklmnop leaked", None) == "key [redacted] leaked"
    assert clean_message("a\n  b\tc", None) == "a b c"
    assert len(clean_message("x" * 1000, None)) == 300
