"""Other APIs' streams of one generation on one node (hub.transcode), through real HTTP: every stream of a chat in the
AI SDK's format reads one encoder, so each channel event is encoded once on the node however many tabs follow the
chat, and a stream that joins while the node follows the channel is served from memory (no store read, no replay),
exactly; a node that drains ends each stream with its format's own ending, after which another node resumes it
exactly."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from hub.app import begin_drain
from producer.settings import ProducerSettings
from ssecore.backend_memory import MemoryBackend
from ssecore.queue_memory import MemoryJobQueue
from tests.conftest import ClientFactory
from tests.hub.test_resume_window import CountingBackend

Client = TestClient[Any, Any]
SLOW = ProducerSettings(metrics_port=0, poll_s=0.05, demo_tokens_per_s=40)
CHAT = {"messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}


def _datas(raw: bytes) -> list[Any]:
    return [orjson.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: {")]


async def _read_chunks(resp: Any, n: int) -> bytes:
    return b"".join([await resp.content.readuntil(b"\n\n") for _ in range(n)])


async def test_a_chats_streams_share_one_encoder_and_joiners_read_nothing_from_the_store(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hub import ai_sdk

    encoded: list[str] = []
    encode = ai_sdk._Chunks.encode

    def counted(self: Any, kind: str, raw: str) -> list[bytes]:
        encoded.append(kind)
        return encode(self, kind, raw)

    monkeypatch.setattr(ai_sdk._Chunks, "encode", counted)
    counting = CountingBackend(MemoryBackend(history=10_000, ttl_s=3600))
    hub = await make_client(counting, worker_settings=SLOW)
    post = await hub.post("/v1/ai-sdk/chat", json={"id": "tabs", "model": "demo/demo:30", **CHAT})
    assert post.status == 200
    head = await _read_chunks(post, 6)
    reads = counting.ranges
    tabs = [await hub.get("/v1/ai-sdk/chat/tabs/stream") for _ in range(3)]
    assert [t.status for t in tabs] == [200, 200, 200]
    bodies = await asyncio.gather(*(t.read() for t in tabs))
    whole = head + await post.read()
    assert whole.endswith(b"data: [DONE]\n\n") and _datas(whole)[-1] == {"type": "finish", "finishReason": "stop"}
    assert all(body == whole for body in bodies)  # each tab: the whole message from its start, once
    assert counting.ranges == reads  # served from the node's memory of the chat's stream
    entries = (await counting.inner.range("aichat:tabs", "0", limit=1000)).entries
    assert len(encoded) == len(entries)  # four streams, each event encoded once


async def test_a_response_streamed_again_from_any_number_is_served_from_memory(make_client: ClientFactory) -> None:
    counting = CountingBackend(MemoryBackend(history=10_000, ttl_s=3600))
    hub = await make_client(counting, worker_settings=SLOW)
    post = await hub.post("/v1/responses", json={"model": "demo/demo:30", "input": "hi", "stream": True})
    head = await _read_chunks(post, 4)
    rid = _datas(head)[0]["response"]["id"]
    reads = counting.ranges
    again = {
        n: await hub.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": str(n)})
        for n in (-1, 2, 9)
    }
    bodies = {n: _datas(await resp.read()) for n, resp in again.items()}
    whole = _datas(head + await post.read())
    assert [e["sequence_number"] for e in whole] == list(range(len(whole)))
    assert whole[-1]["type"] == "response.completed"
    for n, body in bodies.items():
        assert body == whole[n + 1 :]
    assert counting.ranges == reads


async def _two_nodes(make_client: ClientFactory) -> tuple[Client, Client]:
    backend, jobs = MemoryBackend(history=10_000, ttl_s=3600), MemoryJobQueue()
    draining = await make_client(backend, jobs=jobs, worker_settings=SLOW, grace_s=0.2)
    other = await make_client(backend, jobs=jobs, embedded_worker="off")
    return draining, other


async def test_a_drained_response_stream_ends_failed_and_resumes_on_another_node_exactly(
    make_client: ClientFactory,
) -> None:
    a, b = await _two_nodes(make_client)
    body = {"model": "demo/demo:40", "input": "hi", "stream": True, "background": True}
    post = await a.post("/v1/responses", json=body)
    head = await _read_chunks(post, 8)
    await begin_drain(a.app)
    got = _datas(head + await post.read())
    cut = got.pop()
    assert cut["type"] == "response.failed" and cut["response"]["error"]["code"] == "interrupted"
    # The ending is no event of the response: it repeats the last number, so a resume after it misses nothing.
    assert cut["sequence_number"] == got[-1]["sequence_number"] == len(got) - 1
    rid = got[0]["response"]["id"]
    after = str(max(e["sequence_number"] for e in [*got, cut]))
    rest = await b.get(f"/v1/responses/{rid}", params={"stream": "true", "starting_after": after})
    resumed = got + _datas(await rest.read())
    assert resumed[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in resumed] == list(range(len(resumed)))
    whole = await b.get(f"/v1/responses/{rid}", params={"stream": "true"})
    # The same events; only the stream the POST opened says `background` (a read does not know it).
    assert _datas(await whole.read()) == [_foreground(e) for e in resumed]


def _foreground(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "response": {**event["response"], "background": False}} if "response" in event else event


async def test_a_drained_chat_stream_ends_with_no_chunk_and_resumes_by_index_on_another_node(
    make_client: ClientFactory,
) -> None:
    a, b = await _two_nodes(make_client)
    post = await a.post("/v1/ai-sdk/chat", json={"id": "drained", "model": "demo/demo:40", **CHAT})
    head = await _read_chunks(post, 6)
    await begin_drain(a.app)
    raw = head + await post.read()
    got = _datas(raw)
    # Neither `finish` (the answer goes on) nor any other chunk, which WorkflowChatTransport would count: a comment.
    assert got[-1]["type"] == "text-delta" and raw.endswith(b"\n\n: interrupted: resume the chat's stream\n\n")
    rest = await b.get("/v1/ai-sdk/chat/drained/stream", params={"startIndex": str(len(got))})
    whole = await b.get("/v1/ai-sdk/chat/drained/stream")
    expected = _datas(await whole.read())
    assert got + _datas(await rest.read()) == expected and expected[-1] == {"type": "finish", "finishReason": "stop"}
