"""The README's quick start as a user runs it: a hub started the way `make run` starts it, then each curl command the
README shows, read out of the README and checked for what the README says it prints; and what a restart keeps."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from ssecore.demo import TEXT
from ssecore.sse import SSEEvent, SSEParser
from tests.support import ROOT, ServiceProcess, free_port, wait_http_ok

README_ORIGIN = "localhost:8080"
STREAM_TIMEOUT_S = 30.0


@dataclass
class Command:
    argv: list[str]
    shown: str | None  # the output the README shows for it: the comment line that follows it

    def option(self, name: str) -> str:
        return self.argv[self.argv.index(name) + 1]


def quick_start() -> str:
    """The README's `## Quick start` section."""
    sections: list[str] = re.findall(r"^## Quick start\n(.*?)(?=^## )", (ROOT / "README.md").read_text(), re.S | re.M)
    assert len(sections) == 1, "the README has one Quick start section"
    return sections[0]


def curl_commands(section: str, port: int) -> list[Command]:
    """Every curl command of the section's shell blocks, as the shell would split it, aimed at the hub on `port`."""
    commands: list[Command] = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("# ") and commands:
                commands[-1].shown = line[2:].strip()
            elif line.startswith("curl "):
                commands.append(Command(shlex.split(line.replace(README_ORIGIN, f"localhost:{port}")), None))
    return commands


def shown_pattern(shown: str | None) -> re.Pattern[str]:
    """What the README shows a command printing, with each `…` standing for a value it cannot know."""
    assert shown is not None, "the README shows what this command prints"
    return re.compile(re.escape(shown).replace("…", '[^"]+'))


def make_run_args(port: int) -> list[str]:
    """The hub's arguments in the Makefile's `run` recipe, on `port` instead of $(PORT)."""
    (recipe,) = re.findall(r"^run:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    (line,) = [line.strip() for line in recipe.splitlines() if " -m hub" in line]
    argv = shlex.split(line.replace("$(PORT)", str(port)))
    assert argv[:3] == ["$(BIN)/python", "-m", "hub"], line
    return argv[3:]


class MakeRunHub(ServiceProcess):
    """`python -m hub` with the `run` recipe's arguments, in an environment without HUB_ or PRODUCER_ settings."""

    module = "hub"

    def __init__(self, port: int) -> None:
        super().__init__(*make_run_args(port))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("HUB_", "PRODUCER_"))}
        self.url = f"http://localhost:{port}"

    async def ready(self, session: aiohttp.ClientSession) -> None:
        self.start()
        await wait_http_ok(session, f"{self.url}/readyz", why=self.log)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def hubs() -> Iterator[list[MakeRunHub]]:
    started: list[MakeRunHub] = []
    yield started
    for hub in started:
        hub.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


class Curl:
    """One curl process, its output read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = b""

    @classmethod
    async def start(cls, argv: list[str]) -> Curl:
        return cls(await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE))

    async def read_until(self, marker: bytes) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            while marker not in self.out:
                chunk = await self.proc.stdout.read(65536)
                assert chunk, f"curl ended before {marker!r}: {self.out!r}"
                self.out += chunk

    async def read_event(self, name: str) -> SSEEvent:
        """The first event of that name in what it prints (it may print more before it)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            while not (found := [e for e in events(self.out.decode()) if e.event == name]):
                chunk = await self.proc.stdout.read(65536)
                assert chunk, f"curl ended before an event {name!r}: {self.out!r}"
                self.out += chunk
        return found[0]

    async def finish(self) -> str:
        """All it prints, once it ends by itself."""
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            rest, _ = await self.proc.communicate()
        self.out += rest
        assert self.proc.returncode == 0, self.out
        return self.out.decode()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def run(argv: list[str]) -> str:
    curl = await Curl.start(argv)
    try:
        return await curl.finish()
    finally:
        await curl.stop()


def events(stream: str) -> list[SSEEvent]:
    return SSEParser().feed(stream.encode())


def check_generation(stream: str, generation: dict[str, str]) -> list[SSEEvent]:
    """A whole generation, as the README says it streams: `start`, its `token` events, then `done`."""
    evs = events(stream)
    names = [e.event for e in evs]
    assert names[0] == "start" and json.loads(evs[0].data)["id"] == generation["id"], stream
    assert names[-1] == "done" and json.loads(evs[-1].data)["finish_reason"] == "stop", stream
    assert len(names) > 2 and set(names[1:-1]) == {"token"}, names
    return evs


@pytest.mark.e2e
@pytest.mark.slow
async def test_the_quick_start_commands_print_what_the_readme_says(
    port: int, hubs: list[MakeRunHub], session: aiohttp.ClientSession
) -> None:
    section = quick_start()
    subscribe, publish, generate, follow = curl_commands(section, port)
    hub = MakeRunHub(port)
    hubs.append(hub)
    await hub.ready(session)

    # Subscribe, publish in another shell: the subscriber prints the events as published, then ends.
    assert "-X" not in subscribe.argv and subscribe.argv[-1] == publish.argv[-1]
    subscriber = await Curl.start(subscribe.argv)
    try:
        await subscriber.read_until(b"\nid: ")  # the stream's opening: its live position
        answer = await run(publish.argv)
        assert shown_pattern(publish.shown).fullmatch(answer.strip()), answer
        ids = json.loads(answer)["ids"]
        published = json.loads(publish.option("-d"))
        stream = await subscriber.finish()
    finally:
        await subscriber.stop()
    expected = [
        (i, e["event"], e["data"] if isinstance(e["data"], str) else json.dumps(e["data"]))
        for i, e in zip(ids, published, strict=True)
    ]
    assert [(e.id, e.event, e.data) for e in events(stream)] == expected
    assert published[-1].get("close") is True

    # A generation, then its stream from the start: the README's URL is the answer's events_url.
    answer = await run(generate.argv)
    assert shown_pattern(generate.shown).fullmatch(answer.strip()), answer
    generation = json.loads(answer)
    follow_argv = [a.replace("gen_…", generation["id"]) for a in follow.argv]
    assert follow_argv[-1] == f"{hub.url}{generation['events_url']}?last_event_id=0"
    check_generation(await run(follow_argv), generation)

    # The same in one request.
    (extra,) = re.findall(r"add\s+`([^`]+)`\s+to the `POST`", section)
    stream = await run([*generate.argv, *shlex.split(extra)])
    check_generation(stream, json.loads(events(stream)[0].data))

    # The OpenAI SDK pointed at the hub: the README's lines, run as written (on this test's port).
    (snippet,) = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert len(snippet.strip().splitlines()) == 3
    printed = await run([sys.executable, "-c", snippet.replace("localhost:8080", f"127.0.0.1:{port}")])
    assert printed.strip() == TEXT.strip(), printed


@pytest.mark.e2e
@pytest.mark.slow
async def test_a_restarted_make_run_hub_keeps_nothing_and_says_so_to_a_resuming_client(
    port: int, hubs: list[MakeRunHub], session: aiohttp.ClientSession
) -> None:
    _, _, generate, follow = curl_commands(quick_start(), port)
    first = MakeRunHub(port)
    hubs.append(first)
    await first.ready(session)
    generation = json.loads(await run(generate.argv))
    follow_argv = [a.replace("gen_…", generation["id"]) for a in follow.argv]
    last_id = check_generation(await run(follow_argv), generation)[-1].id

    # Ctrl-C, then `make run` again: the channel is gone, and a client that resumes from the id it had is told so.
    first.signal(signal.SIGINT)
    assert first.wait(20) == 0, first.log()
    second = MakeRunHub(port)
    hubs.append(second)
    await second.ready(session)
    resume = await Curl.start([a.replace("last_event_id=0", f"last_event_id={last_id}") for a in follow_argv])
    try:
        reset = await resume.read_event("reset")
    finally:
        await resume.stop()
    assert json.loads(reset.data)["reason"] == "expired", resume.out


def test_the_readme_and_the_makefile_are_read_as_the_shell_reads_them() -> None:
    commands = curl_commands(
        "```sh\ncurl -X POST \\\n     -d '{\"a\": 1}' \\\n     http://localhost:8080/x\n# {}\n```\n", 1
    )
    assert [(c.argv, c.shown) for c in commands] == [
        (["curl", "-X", "POST", "-d", '{"a": 1}', "http://localhost:1/x"], "{}")
    ]
    assert make_run_args(1) == ["--port", "1", "--anonymous"]
    assert shown_pattern('{"id":"gen_…"}').fullmatch('{"id":"gen_abc"}')
    assert not shown_pattern('{"id":"gen_…"}').fullmatch('{"id":"gen_abc","x":1}')
