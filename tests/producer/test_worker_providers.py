"""A worker driving real provider clients against the fake provider server: retries, failures, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import orjson
import pytest

from producer.providers.anthropic import AnthropicProvider
from producer.providers.base import Provider, TextDelta
from producer.providers.gemini import GeminiProvider
from producer.providers.openai import OpenAIProvider
from producer.settings import ProducerSettings, providers_for
from producer.worker import Worker
from ssecore.backend import ChannelClosed, Entry, NewEvent
from ssecore.backend_memory import MemoryBackend
from ssecore.jobs import Job, new_generation_id
from ssecore.queue_memory import MemoryJobQueue
from tests.producer.fake_providers import DEFAULT_TOKENS, TEST_API_KEY, Behaviour, FakeProviders, numbered_tokens
from tests.support import settled


@dataclass
class Rig:
    fake: FakeProviders
    backend: MemoryBackend
    queue: MemoryJobQueue
    worker: Worker

    async def run(self, provider: str, model: str) -> tuple[Job, list[Entry]]:
        gid = new_generation_id()
        job = Job(
            id=gid, provider=provider, model=model, messages=[{"role": "user", "content": "hi"}], channel=f"gen:{gid}"
        )
        await self.queue.submit(job)
        return job, await self.wait_closed(job.channel)

    async def wait_closed(self, channel: str, timeout_s: float = 20) -> list[Entry]:
        deadline = time.monotonic() + timeout_s
        while (info := await self.backend.info(channel)) is None or not info.closed:
            assert time.monotonic() < deadline, f"{channel} not finished"
            await asyncio.sleep(0.02)
        return (await self.backend.range(channel, "0", limit=10_000)).entries


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with FakeProviders() as fake:
        backend = MemoryBackend(history=10_000, ttl_s=3600)
        queue = MemoryJobQueue()
        providers: dict[str, Provider] = {
            "openai": OpenAIProvider(fake.config("openai")),
            "anthropic": AnthropicProvider(fake.config("anthropic")),
            "gemini": GeminiProvider(fake.config("gemini")),
        }
        settings = ProducerSettings(metrics_port=0, poll_s=0.05, backoff_s=0.05, backoff_max_s=3)
        worker = Worker(settings, backend=backend, queue=queue, providers=providers)
        task = asyncio.create_task(worker.run_async())
        yield Rig(fake, backend, queue, worker)
        worker.stop()
        await task


def _text(entries: list[Entry]) -> str:
    return "".join(orjson.loads(e.data)["text"] for e in entries if e.event == "token")


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_a_normal_stream_becomes_start_tokens_done_with_usage(rig: Rig, provider: str) -> None:
    job, entries = await rig.run(provider, "normal")
    assert [e.event for e in entries] == ["start"] + ["token"] * len(DEFAULT_TOKENS) + ["done"]
    assert _text(entries) == "".join(DEFAULT_TOKENS)
    done = orjson.loads(entries[-1].data)
    assert done["finish_reason"] == "stop"
    assert done["usage"]["input_tokens"] is not None and done["usage"]["output_tokens"] is not None
    record = await settled(rig.queue, job.id)
    assert record.status == "done" and record.usage == done["usage"]


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_a_429_before_the_first_token_is_retried_after_retry_after(rig: Rig, provider: str) -> None:
    rig.fake.behaviours["retry-fast"] = Behaviour(reject="rate_limit", reject_times=1, retry_after="0.3")
    started = time.monotonic()
    job, entries = await rig.run(provider, "retry-fast")
    assert time.monotonic() - started >= 0.3  # honoured Retry-After
    assert [e.event for e in entries][-1] == "done" and _text(entries) == "".join(DEFAULT_TOKENS)
    assert len(rig.fake.requests_for("retry-fast")) == 2
    assert (
        rig.worker.metrics.registry.get_sample_value(
            "producer_provider_errors_total", {"provider": provider, "status": "429", "code": "rate_limited"}
        )
        == 1.0
    )


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_a_quota_429_is_not_retried(rig: Rig, provider: str) -> None:
    _, entries = await rig.run(provider, "quota")
    assert [e.event for e in entries] == ["start", "error"]
    assert orjson.loads(entries[-1].data)["code"] == "quota_exhausted"
    assert len(rig.fake.requests_for("quota")) == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_a_stream_cut_after_tokens_ends_with_one_error_event(rig: Rig, provider: str) -> None:
    job, entries = await rig.run(provider, "cut")
    names = [e.event for e in entries]
    assert names == ["start", "token", "token", "error"]
    err = orjson.loads(entries[-1].data)
    assert err["code"] == "stream_truncated" and TEST_API_KEY not in err["message"]
    assert len(rig.fake.requests_for("cut")) == 1  # after the first token a failure is final
    record = await settled(rig.queue, job.id)
    assert record.status == "error" and record.error == err


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_an_error_reported_inside_a_200_stream_ends_with_an_error_event(rig: Rig, provider: str) -> None:
    _, entries = await rig.run(provider, "stream-error")
    assert [e.event for e in entries][-1] == "error"
    assert [e.event for e in entries].count("token") == 2


async def test_a_malformed_chunk_ends_with_an_error_event(rig: Rig) -> None:
    _, entries = await rig.run("openai", "malformed")
    assert entries[-1].event == "error" and orjson.loads(entries[-1].data)["code"] == "bad_response"


async def test_multibyte_characters_split_across_reads_arrive_intact(rig: Rig) -> None:
    _, entries = await rig.run("openai", "split-utf8")
    assert _text(entries) == "héllo wörld 🌍!"


async def test_cancel_aborts_the_provider_request_within_a_second(rig: Rig) -> None:
    rig.fake.behaviours["long"] = Behaviour(tokens=numbered_tokens(2000), pace_s=0.02)
    gid = new_generation_id()
    job = Job(
        id=gid, provider="openai", model="long", messages=[{"role": "user", "content": "hi"}], channel=f"gen:{gid}"
    )
    await rig.queue.submit(job)
    deadline = time.monotonic() + 10
    while len((await rig.backend.range(job.channel, "0", limit=100)).entries) < 10:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    asked = time.monotonic()
    await rig.queue.request_cancel(job.id)
    entries = await rig.wait_closed(job.channel)
    assert time.monotonic() - asked < 1.0
    assert orjson.loads(entries[-1].data)["finish_reason"] == "cancelled"
    [request] = rig.fake.requests_for("long")
    await asyncio.wait_for(request.disconnected.wait(), 2)  # the provider saw the request go away
    assert _text(entries) == "".join(numbered_tokens(2000)[: len(entries) - 2])


async def test_a_job_whose_channel_is_already_closed_only_records_how_it_ended(rig: Rig) -> None:
    # As after a worker stored the terminal event and died before acknowledging: the re-run must not call the
    # provider again, and the record must say what the channel says.
    gid = new_generation_id()
    channel = f"gen:{gid}"
    error = {"code": "overloaded", "message": "try later"}
    await rig.backend.append(
        channel, [NewEvent("start", "{}"), NewEvent("error", orjson.dumps(error).decode())], close=True
    )
    job = Job(id=gid, provider="openai", model="normal", messages=[{"role": "user", "content": "hi"}], channel=channel)
    await rig.queue.submit(job)
    deadline = time.monotonic() + 10
    while (record := await rig.queue.get(gid)) is None or record.status == "queued" or record.status == "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert record.status == "error" and record.error == error
    assert rig.fake.requests_for("normal") == []
    assert len((await rig.backend.range(channel, "0", limit=10)).entries) == 2


async def test_an_unexpected_failure_ends_the_generation_with_an_internal_error(rig: Rig) -> None:
    class Broken:
        name = "broken"
        kind = "openai"

        async def stream(self, session: object, request: object) -> AsyncGenerator[TextDelta, None]:
            yield TextDelta("partial")
            raise KeyError("a bug")

    rig.worker._providers = {**rig.worker._providers, "broken": Broken()}
    job, entries = await rig.run("broken", "any")
    assert [e.event for e in entries] == ["start", "token", "error"]
    assert orjson.loads(entries[-1].data) == {"code": "internal", "message": "the generation failed inside the worker"}
    record = await settled(rig.queue, job.id)
    assert record.status == "error"
    assert rig.queue._running == {}  # acknowledged: it will not run again


async def test_events_after_a_close_are_refused_not_stored_after_it(rig: Rig) -> None:
    from producer.coalesce import Coalescer
    from ssecore.backend import Fence

    c = Coalescer(rig.backend, rig.worker.metrics, window_s=0.01)
    fence = Fence("job", 1, take=True)
    first = c.add("closing", NewEvent("token", "a"), fence)
    end = c.add("closing", NewEvent("done", "{}"), Fence("job", 1), close=True)
    late = c.add("closing", NewEvent("token", "late"), Fence("job", 1))
    assert isinstance(late.exception(), ChannelClosed)
    await first
    await end
    entries = (await rig.backend.range("closing", "0", limit=10)).entries
    assert [(e.event, e.close) for e in entries] == [("token", False), ("done", True)]


# -- No second request once the provider accepted the first (a 429 before any byte is retried: see above) ------------


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_an_error_after_the_provider_accepted_is_not_retried_even_before_any_token(
    rig: Rig, provider: str
) -> None:
    # A 200, then the provider's own retryable in-stream error before anything of the answer: it may have begun the
    # work (and the bill), so asking again could run it twice.
    rig.fake.behaviours["accepted-then-error"] = Behaviour(error_after=0)
    job, entries = await rig.run(provider, "accepted-then-error")
    assert [e.event for e in entries] == ["start", "error"]
    assert len(rig.fake.requests_for("accepted-then-error")) == 1
    record = await settled(rig.queue, job.id)
    assert record.status == "error" and record.error == orjson.loads(entries[-1].data)


@pytest.fixture
async def patient_rig() -> AsyncIterator[Rig]:
    """A worker built from its settings, as `python -m producer` builds it: a first-byte timeout of a second, and an
    idle timeout (between chunks) far shorter."""
    async with FakeProviders() as fake:
        backend = MemoryBackend(history=10_000, ttl_s=3600)
        queue = MemoryJobQueue()
        settings = ProducerSettings(
            metrics_port=0,
            poll_s=0.05,
            backoff_s=0.05,
            first_byte_timeout_s=1,
            openai_timeout_s=0.2,
            anthropic_timeout_s=0.2,
            gemini_timeout_s=0.2,
        )
        keys = fake.provider_keys()
        worker = Worker(settings, backend=backend, queue=queue, providers=providers_for(settings, keys))
        task = asyncio.create_task(worker.run_async())
        yield Rig(fake, backend, queue, worker)
        worker.stop()
        await task


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_the_first_byte_has_its_own_timeout_and_past_it_the_generation_ends_after_one_call(
    patient_rig: Rig, provider: str
) -> None:
    rig = patient_rig
    # A model that thinks longer than the idle timeout before answering is waited for...
    rig.fake.behaviours["thinker"] = Behaviour(head_delay_s=0.5)
    _, entries = await rig.run(provider, "thinker")
    assert entries[-1].event == "done" and _text(entries) == "".join(DEFAULT_TOKENS)
    # ...up to the first-byte timeout; then the generation ends, and the request is not sent again.
    rig.fake.behaviours["mute"] = Behaviour(head_delay_s=30)
    started = time.monotonic()
    job, entries = await rig.run(provider, "mute")
    assert 1 <= time.monotonic() - started < 3
    assert [e.event for e in entries] == ["start", "error"]
    error = orjson.loads(entries[-1].data)
    assert error["code"] == "timeout" and "first-byte" in error["message"]
    assert len(rig.fake.requests_for("mute")) == 1
    assert (await settled(rig.queue, job.id)).status == "error"
