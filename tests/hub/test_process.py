"""`python -m hub` as a real process: settings from flags and environment, start-up log, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.support import ROOT, HubProcess, RedisServer, collect

pytestmark = pytest.mark.e2e


@pytest.fixture
def hubs() -> Iterator[list[HubProcess]]:
    started: list[HubProcess] = []
    yield started
    for h in started:
        h.close()


def _start(hubs: list[HubProcess], *args: str, env: dict[str, str] | None = None) -> HubProcess:
    node = HubProcess(*args, env=env)
    hubs.append(node)
    node.start()
    return node


async def test_embedded_backend_is_announced_and_settings_come_from_environment(hubs: list[HubProcess]) -> None:
    node = _start(hubs, env={"HUB_RETRY_MS": "1234", "HUB_LOG_LEVEL": "info"})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{node.url}/v1/channels/x/events") as resp:
            assert (await resp.content.readuntil(b"\n\n")) == b"retry: 1234\n\n"
    assert "embedded memory backend" in node.log()


async def test_flag_overrides_environment_and_redis_backend_is_used(
    hubs: list[HubProcess], redis_server: RedisServer
) -> None:
    node = _start(
        hubs,
        "--retry-ms",
        "777",
        "--redis-url",
        redis_server.url,
        "--key-prefix",
        "proc:",
        env={"HUB_RETRY_MS": "1234"},
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{node.url}/v1/channels/x/events") as resp:
            assert (await resp.content.readuntil(b"\n\n")) == b"retry: 777\n\n"
        async with s.get(f"{node.url}/readyz") as ready:
            assert ready.status == 200
    assert "Redis backend" in node.log()


def test_a_kubernetes_service_link_in_a_setting_is_named_as_such() -> None:
    # A Service called `hub` in the pod's namespace makes Kubernetes set HUB_PORT=tcp://<ip>:<port>.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["HUB_PORT"] = "tcp://10.96.0.12:80"
    proc = subprocess.run(
        [sys.executable, "-m", "hub", "--anonymous"], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 2
    assert "HUB_PORT" in proc.stderr and "enableServiceLinks: false" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--history", "0"], "history"),
        (["--port", "http"], "port"),
        (["--redis-url", "localhost:6379"], "redis-url"),
        (["--log-level", "loud"], "log-level"),
        # A body the hub accepts must fit the byte bucket, or it would be refused for ever.
        (["--publish-bytes-burst", "100000"], "--publish-bytes-burst (HUB_PUBLISH_BYTES_BURST): must be at least"),
        (["--max-job-bytes", "5000000"], "--publish-bytes-burst (HUB_PUBLISH_BYTES_BURST): must be at least"),
        (["--max-job-bytes", "100"], "--max-job-bytes (HUB_MAX_JOB_BYTES): must be at least 1024"),
        (["--anonymous", "--jwt-secret", "short"], "jwt-secret"),
        (["--anonymous", "--api-keys", "svc tooshort chat:*"], "at least 16 characters"),
        (["--anonymous", "--api-keys-file", "/nonexistent/keys"], "--api-keys-file (HUB_API_KEYS_FILE)"),
        (["--jwt-public-key", "/nonexistent/key.pem"], "--jwt-public-key (HUB_JWT_PUBLIC_KEY)"),
        (["--redis-url", "redis://127.0.0.1:six/0"], "--redis-url (HUB_REDIS_URL)"),
        # Redis is given one way: by URL, or by Sentinels and the name of the master they watch.
        (
            ["--redis-url", "redis://127.0.0.1:1/0", "--redis-sentinels", "127.0.0.1:1"],
            "--redis-sentinels (HUB_REDIS_SENTINELS): give either --redis-url (HUB_REDIS_URL) or Sentinels",
        ),
        (["--redis-sentinels", "127.0.0.1:1"], "--redis-sentinel-master (HUB_REDIS_SENTINEL_MASTER): must name"),
        (["--redis-sentinel-master", "m"], "--redis-sentinel-master (HUB_REDIS_SENTINEL_MASTER): needs --redis-sen"),
        (["--redis-sentinels", "127.0.0.1", "--redis-sentinel-master", "m"], "'127.0.0.1' is not host:port"),
        (["--redis-url", "redis://127.0.0.1:1/0", "--redis-password", "pw"], "--redis-password (HUB_REDIS_PASSWORD)"),
        (["--host", "192.0.2.1"], "--host (HUB_HOST)"),  # an address of no host here (TEST-NET-1)
        # A round of the live tail with Redis down is a read that times out (1 + 1 s) and a pause of up to 2 s: a
        # bound below that would fail liveness, and restart every node, while Redis is merely down.
        (
            ["--tail-block", "1", "--redis-timeout", "1", "--tail-stuck-after", "3"],
            "--tail-stuck-after (HUB_TAIL_STUCK_AFTER): must",
        ),
        ([], "--anonymous"),  # authentication is on by default, and there is nothing to authenticate with
    ],
)
def test_bad_settings_stop_the_process_with_a_clear_message(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    if args and "--anonymous" not in args:
        args = [*args, "--anonymous"]
    proc = subprocess.run(
        [sys.executable, "-m", "hub", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 2
    assert message in proc.stderr.splitlines()[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_hub_on_a_port_another_process_holds_says_which_setting_to_change() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--anonymous", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.run(
            [sys.executable, "-m", "hub", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
        )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "--port" in line]
    assert line == proc.stderr.splitlines()[-1]
    assert line.startswith(f"python -m hub: cannot listen on 127.0.0.1:{port}") and "(HUB_PORT)" in line
    assert "hub listening" not in proc.stderr  # said once it is, not before


async def test_sigterm_drains_streams_and_exits_within_grace(hubs: list[HubProcess]) -> None:
    node = _start(hubs, "--grace", "4")
    async with aiohttp.ClientSession() as s:
        streams = [await s.get(f"{node.url}/v1/channels/d{i % 2}/events") for i in range(6)]
        for r in streams:
            await r.content.readuntil(b"\n\n")
        for ch in ("d0", "d1"):
            async with s.post(f"{node.url}/v1/channels/{ch}/events", json=[{"data": "a"}, {"data": "b"}]) as p:
                assert p.status == 201
        started = time.monotonic()
        node.signal(signal.SIGTERM)
        # While its streams drain (spread over half the grace period) the node still answers: not ready, and no new
        # streams, so a load balancer moves clients elsewhere.
        await asyncio.sleep(0.1)
        async with s.get(f"{node.url}/readyz") as ready:
            assert ready.status == 503 and (await ready.json())["reason"] == "draining"
        async with s.get(f"{node.url}/v1/channels/d0/events") as refused:
            assert refused.status == 503 and refused.headers["Retry-After"]
        # Every stream gets its pending events, then a clean end: the clients would reconnect elsewhere and resume.
        results = await asyncio.gather(*(collect(r, timeout_s=10) for r in streams))
        for evs in results:
            assert [e.data for e in evs] == ["a", "b"]
        code = await asyncio.to_thread(node.wait, 10)
        assert code == 0
        assert time.monotonic() - started < 4 + 2
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.get(f"{node.url}/v1/channels/d0/events")


def test_a_backlog_the_kernel_caps_is_said_at_start_with_what_to_raise() -> None:
    from hub.__main__ import backlog_warning

    warning = backlog_warning(32768, 4096)
    assert warning is not None and "net.core.somaxconn" in warning and "4096" in warning and "32768" in warning
    assert backlog_warning(4096, 4096) is None
    assert backlog_warning(4096, None) is None  # not Linux, or /proc not readable: nothing to say
