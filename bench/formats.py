"""Client protocols benchmark: the hub's CPU per delivered token when the same generations are streamed natively
(`POST /v1/generations`) and through the AI clients' protocols (`POST /v1/chat/completions`, `POST /v1/responses`,
`POST /v1/ai-sdk/chat`).

Starts its own redis-server, one hub (no embedded worker) and one `python -m producer` worker with the demo provider
paced like a model. Each round runs every protocol in turn, in an order rotated per round (a shared machine's noise
falls on all of them): N generations at once, each read to its end by a client that counts the answer's tokens. The
hub's CPU (user + system, from /proc) over a protocol's window, divided by the tokens delivered, is the figure; the
table shows each protocol's median over the rounds and its ratio to the native stream's, measured in the same run.
Bounded; stops by itself. Prints a Markdown report (also written to --out).

    python bench/formats.py --generations 200 --tokens 100 --rounds 3 --out bench/results-formats.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Report, cpu_seconds  # noqa: E402
from tests.processes import RedisServer  # noqa: E402
from tests.support import HubProcess, ProducerProcess  # noqa: E402


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    path: str
    body: Callable[[int, int], dict[str, Any]]  # (generation number, tokens) -> the request
    is_token: Callable[[bytes], bool]  # whether a `data:` line is one token of the answer
    headers: tuple[tuple[str, str], ...] = ()


def _messages(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"benchmark {i}"}]


def _data(line: bytes) -> Any:
    return orjson.loads(line[6:]) if line.startswith(b"data: {") else None


def _native_token(line: bytes) -> bool:
    # The native stream names its events: a token's `data:` follows `event: token` (the reader marks it so).
    return line.startswith(b"token ")


def _chat_token(line: bytes) -> bool:
    chunk = _data(line)
    return bool(chunk and chunk["choices"] and chunk["choices"][0]["delta"].get("content"))


def _responses_token(line: bytes) -> bool:
    return b'"type":"response.output_text.delta"' in line


def _ai_sdk_token(line: bytes) -> bool:
    return b'"type":"text-delta"' in line


PROTOCOLS = (
    Protocol(
        "native SSE (POST /v1/generations)",
        "/v1/generations",
        lambda i, n: {"provider": "demo", "model": f"demo:{n}", "messages": _messages(i)},
        _native_token,
        (("Accept", "text/event-stream"),),
    ),
    Protocol(
        "OpenAI Chat Completions (POST /v1/chat/completions)",
        "/v1/chat/completions",
        lambda i, n: {"model": f"demo/demo:{n}", "messages": _messages(i), "stream": True},
        _chat_token,
    ),
    Protocol(
        "OpenAI Responses (POST /v1/responses)",
        "/v1/responses",
        lambda i, n: {"model": f"demo/demo:{n}", "input": f"benchmark {i}", "stream": True},
        _responses_token,
    ),
    Protocol(
        "Vercel AI SDK UI messages (POST /v1/ai-sdk/chat)",
        "/v1/ai-sdk/chat",
        lambda i, n: {
            "id": f"bench-{time.monotonic_ns()}-{i}",
            "model": f"demo/demo:{n}",
            "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": f"benchmark {i}"}]}],
        },
        _ai_sdk_token,
    ),
)


async def _generation(session: aiohttp.ClientSession, url: str, protocol: Protocol, i: int, tokens: int) -> int:
    """One generation, read to its end: the tokens it delivered."""
    async with session.post(url + protocol.path, json=protocol.body(i, tokens), headers=dict(protocol.headers)) as r:
        if r.status != 200:
            raise RuntimeError(f"{protocol.path}: {r.status} {(await r.text())[:300]}")
        count, event = 0, b""
        async for raw in r.content:
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"event: "):
                event = line[7:]
            elif line.startswith(b"data: "):
                count += protocol.is_token(event + b" " + line if protocol.name.startswith("native") else line)
                event = b""
        return count


async def _round(url: str, protocol: Protocol, hub_pid: int, n: int, tokens: int) -> tuple[float, int, float]:
    """(hub CPU µs per delivered token, tokens delivered, wall seconds) of n generations at once."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        cpu0, t0 = cpu_seconds(hub_pid), time.monotonic()
        counts = await asyncio.gather(*(_generation(session, url, protocol, i, tokens) for i in range(n)))
        cpu, wall = cpu_seconds(hub_pid) - cpu0, time.monotonic() - t0
    delivered = sum(counts)
    if delivered != n * tokens:
        raise RuntimeError(f"{protocol.name}: {delivered} tokens delivered, {n * tokens} expected")
    return cpu / delivered * 1e6, delivered, wall


async def measure(url: str, hub_pid: int, args: argparse.Namespace, report: Report) -> None:
    await _round(url, PROTOCOLS[0], hub_pid, min(args.generations, 20), args.tokens)  # warm up every path once
    figures: dict[str, list[float]] = {p.name: [] for p in PROTOCOLS}
    walls: dict[str, list[float]] = {p.name: [] for p in PROTOCOLS}
    for r in range(args.rounds):
        order = PROTOCOLS[r % len(PROTOCOLS) :] + PROTOCOLS[: r % len(PROTOCOLS)]
        for protocol in order:
            per_token, _, wall = await _round(url, protocol, hub_pid, args.generations, args.tokens)
            figures[protocol.name].append(per_token)
            walls[protocol.name].append(wall)
            print(f"  round {r + 1}: {protocol.name}: {per_token:.1f} µs/token, {wall:.1f} s", flush=True)
    native = statistics.median(figures[PROTOCOLS[0].name])
    report.add("| protocol | hub CPU per delivered token (median) | ratio to native | each round | wall time |")
    report.add("|---|---|---|---|---|")
    for p in PROTOCOLS:
        med = statistics.median(figures[p.name])
        rounds = ", ".join(f"{f:.1f}" for f in figures[p.name])
        # CPU time comes in clock ticks: a run too small to take one has no ratio.
        ratio = f"{med / native:.2f}×" if native else "n/a"
        report.add(f"| {p.name} | {med:.1f} µs | {ratio} | {rounds} | {statistics.median(walls[p.name]):.1f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=200, help="generations at once, one client each")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per answer")
    ap.add_argument("--tokens-per-s", type=float, default=20, help="the demo provider's pace per generation")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = Report([])
    redis = RedisServer()
    hub = worker = None
    try:
        redis.start()
        hub = HubProcess(
            "--redis-url", redis.url, "--embedded-worker", "off", "--log-level", "warning",
            "--max-streams-per-client", str(args.generations * 2), "--max-generations-per-client", "0",
        )  # fmt: skip
        hub.start()
        worker = ProducerProcess(
            "--redis-url", redis.url, "--demo-tokens-per-s", f"{args.tokens_per_s:g}",
            "--concurrency", str(args.generations * 2), "--metrics-port", "0", "--log-level", "warning",
        )  # fmt: skip
        worker.start()
        assert hub.proc is not None
        report.add(f"# Client protocols benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        report.add()
        report.add(
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. One hub "
            f"node on Redis and one worker with the demo provider at {args.tokens_per_s:g} tokens/s per generation; "
            f"{args.generations} generations at once of {args.tokens} tokens, one client each, read to the end; "
            f"{args.rounds} rounds, the protocols taking turns. The hub's CPU over each protocol's window over the "
            f"tokens delivered. Command: `python bench/formats.py {' '.join(sys.argv[1:])}`"
        )
        report.add()
        asyncio.run(measure(hub.url, hub.proc.pid, args, report))
    finally:
        for process in (worker, hub):
            if process is not None:
                process.close()
        redis.close()
    report.save(args.out)


if __name__ == "__main__":
    main()
