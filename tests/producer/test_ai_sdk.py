"""The Vercel AI SDK's own clients (the `ai` package and @ai-sdk/workflow, pinned by tests/js/package-lock.json, run
with the machine's Node) against a hub: DefaultChatTransport sends a chat and resumes it after its connection is
cut, the message its readUIMessageStream assembles is the generation's, stop cancels, an idle chat resumes to nothing
(204), two resumes at once each get the message once, and a WorkflowChatTransport run resumes by chunk index."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support import ROOT, HubProcess

CLIENT = ROOT / "tests" / "js" / "ai_sdk_client.mjs"
NODE = shutil.which("node")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(NODE is None, reason="Node.js is not installed"),
]


@pytest.fixture(scope="module")
def hub() -> Iterator[HubProcess]:
    # The embedded worker's demo provider at 40 tokens/s: a 40-token answer takes a second, long enough to cut.
    node = HubProcess(env={"PRODUCER_DEMO_TOKENS_PER_S": "40"})
    node.start()
    try:
        yield node
    finally:
        node.close()


async def sdk(hub: HubProcess, scenario: str, chat_id: str | None = None) -> Any:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, str(CLIENT), hub.url, scenario, chat_id or f"chat-{uuid.uuid4().hex[:12]}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def generation(hub: HubProcess, message_id: str) -> dict[str, Any]:
    """The record of the generation behind a UI message (its id is `msg_<x>` for `gen_<x>`), once it has ended."""
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(f"{hub.url}/v1/generations/gen_{message_id.removeprefix('msg_')}") as resp:
                record: dict[str, Any] = await resp.json()
            if record["status"] not in ("queued", "running"):
                return record
            await asyncio.sleep(0.05)
    raise AssertionError(record)


async def test_a_chat_streams_the_generations_message(hub: HubProcess) -> None:
    got = await sdk(hub, "send")
    record = await generation(hub, got["id"])
    assert got["text"] == record["message"]["content"] and len(got["text"].split()) > 30
    assert got["chunks"][:3] == ["start", "start-step", "text-start"] and got["chunks"][-2:] == [
        "finish-step",
        "finish",
    ]


async def test_a_tool_call_arrives_as_the_sdks_tool_part(hub: HubProcess) -> None:
    got = await sdk(hub, "tools")
    assert got["tools"] == [{"type": "tool-get_weather", "state": "input-available", "input": {"city": "Paris"}}]
    assert "tool-input-delta" in got["chunks"] and got["chunks"][-1] == "finish"


async def test_a_cut_connection_resumes_with_the_whole_message_once(hub: HubProcess) -> None:
    got = await sdk(hub, "resume")
    record = await generation(hub, got["id"])
    assert got["before"] == 6  # cut after six chunks; the answer went on (a dropped connection never cancels)
    assert record["status"] == "done" and got["text"] == record["message"]["content"]
    assert got["after"] is None  # resumed again once it ended: nothing running, 204


async def test_two_resumes_at_once_each_get_the_message_once(hub: HubProcess) -> None:
    got = await sdk(hub, "twice")
    first, second = got["texts"]
    assert first == second and len(first.split()) > 30 and first.count("Server-Sent") == 1


async def test_stop_cancels_and_the_stream_ends_with_abort_not_error(hub: HubProcess) -> None:
    got = await sdk(hub, "stop")
    # abort, never error; then finish, without which a WorkflowChatTransport reconnects for ever.
    assert got["chunks"][-2:] == ["abort", "finish"] and "error" not in got["chunks"]
    record = await generation(hub, got["id"])
    assert record["status"] == "cancelled" and record["finish_reason"] == "cancelled"


async def test_a_chat_with_nothing_running_resumes_to_nothing(hub: HubProcess) -> None:
    assert (await sdk(hub, "idle"))["stream"] is None


async def test_a_workflow_chat_transport_run_resumes_by_chunk_index_and_from_the_tail(hub: HubProcess) -> None:
    """@ai-sdk/workflow's WorkflowChatTransport: no chat id (the hub makes the run, x-workflow-run-id), its stream cut
    after six chunks and resumed with ?startIndex=6, then the last three chunks asked with a negative index."""
    got = await sdk(hub, "workflow")
    record = await generation(hub, got["id"])
    assert got["runId"].startswith("run_") and got["text"] == record["message"]["content"]
    assert got["chunks"].count("start") == 1 and got["chunks"][-1] == "finish"  # each chunk once, to the end
    # The last three chunks came; the transport itself drops the text-end whose text-start is before the window.
    assert got["chunks"][-3] == "text-end" and got["tail"] == got["chunks"][-2:]
