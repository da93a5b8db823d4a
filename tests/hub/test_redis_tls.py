"""Redis over TLS, by rediss:// URL and by Sentinels, with the Sentinels' own password: a hub and a worker reach a
TLS-only Redis with the CA (and client certificate) they are given, refuse a server their CA did not sign, and a
wrong combination of settings stops the process at start with one line naming the flag."""

from __future__ import annotations

import asyncio
import gc
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from hub.settings import HubSettings
from producer.settings import ProducerSettings
from ssecore.backend import BackendUnavailable, NewEvent
from ssecore.backend_redis import RedisBackend
from ssecore.redis_client import RedisTarget
from tests.support import (
    ROOT,
    HubProcess,
    ProducerProcess,
    RedisServer,
    TlsFiles,
    TlsRedisSentinels,
    collect,
    free_port,
    make_tls_files,
    read_events,
    run_demo_generation,
    stored_entries,
    tls_only,
    wait_http_ok,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def tls_redis(tls: TlsFiles) -> Iterator[RedisServer]:
    """A redis-server that speaks only TLS and asks every client for a certificate its CA signed."""
    server = tls_only(RedisServer(), tls, "--tls-auth-clients", "yes")
    try:
        server.start()
        yield server
    finally:
        server.close()


def _url(server: RedisServer) -> str:
    return f"rediss://127.0.0.1:{server.port}/0"


async def test_a_backend_reaches_a_tls_only_redis_by_rediss_url_with_a_ca_and_a_client_certificate(
    tls: TlsFiles, tls_redis: RedisServer
) -> None:
    """Appends, history and the live tail's ring subscription (a connection of its own) all go over TLS."""
    target = RedisTarget(
        url=_url(tls_redis), tls_ca_file=tls.ca, tls_cert_file=tls.client_cert, tls_key_file=tls.client_key
    )
    backend = RedisBackend(target, prefix="tls-url:", history=100, ttl_s=60, timeout_s=5)
    try:
        first = await backend.append("c", [NewEvent("message", "one")])
        assert [e.data for e in await stored_entries(backend, "c")] == ["one"]
        reader = await backend.open_reader()
        try:
            assert [e.id for e in (await reader.read({"c": "0-0"}, block_s=1.0)).entries["c"]] == first
            woken = asyncio.create_task(reader.read({"c": first[-1]}, block_s=20.0))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            second = await backend.append("c", [NewEvent("message", "two")])
            assert [e.id for e in (await asyncio.wait_for(woken, 30)).entries["c"]] == second
            assert time.monotonic() - started < 15  # woken by the ring, not by the end of its 20 s block
        finally:
            await reader.aclose()
    finally:
        await backend.aclose()
    del backend, reader
    gc.collect()  # a connection left open warns when collected: now, within the test, where it fails it


@pytest.mark.parametrize("wrong", ["ca", "no-client-certificate"])
async def test_a_tls_redis_that_cannot_be_trusted_or_that_refuses_us_is_unavailable_at_once(
    tls: TlsFiles, tls_redis: RedisServer, wrong: str
) -> None:
    """A server certificate that the given CA did not sign, or a server that wants a client certificate we do not
    have: each call fails within its deadline as BackendUnavailable (a 503), never hangs and never goes through."""
    if wrong == "ca":
        target = RedisTarget(
            url=_url(tls_redis), tls_ca_file=tls.other_ca, tls_cert_file=tls.client_cert, tls_key_file=tls.client_key
        )
    else:
        target = RedisTarget(url=_url(tls_redis), tls_ca_file=tls.ca)
    backend = RedisBackend(target, prefix="tls-wrong:", history=100, ttl_s=60, timeout_s=3)
    try:
        for _ in range(2):  # the pool's next connection is refused too
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as refused:
                await backend.append("c", [NewEvent("message", "never")])
            assert time.monotonic() - started < 3.5
            if wrong == "ca":  # refused by us, for the reason a user needs to see in the log
                assert any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(refused.value)), refused.value
    finally:
        await backend.aclose()
    # Nothing was written: the TLS handshake failed before any command.
    trusted = RedisTarget(
        url=_url(tls_redis), tls_ca_file=tls.ca, tls_cert_file=tls.client_cert, tls_key_file=tls.client_key
    )
    check = RedisBackend(trusted, prefix="tls-wrong:", history=100, ttl_s=60, timeout_s=3)
    try:
        assert await check.info("c") is None
    finally:
        await check.aclose()


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def test_passwords_are_not_shown_in_the_log_line_or_repr_of_where_redis_is() -> None:
    by_url = RedisTarget(url="rediss://app:url-secret@cache.example:6380/0")
    by_sentinels = RedisTarget(
        sentinels=(("10.0.0.1", 26379),),
        master="m",
        username="app",
        password="primary-secret",
        sentinel_password="sentinel-secret",
        tls=True,
    )
    assert by_url.describe() == "rediss://***@cache.example:6380/0"
    assert by_sentinels.describe() == "Sentinel master 'm' at 10.0.0.1:26379 over TLS"
    for shown in (repr(by_url), repr(by_sentinels), str(by_url), str(by_sentinels)):
        assert "secret" not in shown, shown
    # Nor the settings objects, whose URL may carry one.
    hub = HubSettings.from_args(["--redis-url", "redis://:url-secret@h:1/0", "--anonymous"], {})
    worker = ProducerSettings.from_args(["--redis-url", "redis://:url-secret@h:1/0"], {})
    assert "secret" not in repr(hub) and "secret" not in repr(worker)


@pytest.fixture
def sentinels(tls: TlsFiles) -> Iterator[TlsRedisSentinels]:
    servers = TlsRedisSentinels(tls)
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


@pytest.mark.e2e
@pytest.mark.slow
async def test_a_hub_and_a_worker_on_tls_sentinels_with_passwords_serve_and_follow_a_failover(
    tls: TlsFiles, sentinels: TlsRedisSentinels
) -> None:
    """Everything over TLS, the Sentinels asking for their own password: the hub by flags, as an ACL user of its
    own, the worker by environment variables, as the default user. Published events are read back, a generation
    runs, and after kill -9 of the primary both are ready again on the promoted replica. No password reaches either
    log."""
    for server in (sentinels.primary, *sentinels.replicas):  # ACL users are not replicated: each server has its own
        user = ("hub-app", "on", ">hub-app-secret", "~*", "&*", "+@all")
        sentinels.cli(server.port, "acl", "setuser", *user, password=sentinels.PASSWORD)
    hub = HubProcess(
        "--redis-sentinels",
        sentinels.addresses,
        "--redis-sentinel-master",
        sentinels.MASTER,
        "--redis-username",
        "hub-app",
        "--redis-password",
        "hub-app-secret",
        "--redis-sentinel-password",
        sentinels.SENTINEL_PASSWORD,
        "--redis-tls",
        "--redis-tls-ca-file",
        tls.ca,
        "--redis-timeout",
        "2",
        "--tail-block",
        "1",
        "--demo",
    )
    port = free_port()
    env = {
        "PRODUCER_REDIS_SENTINELS": sentinels.addresses,
        "PRODUCER_REDIS_SENTINEL_MASTER": sentinels.MASTER,
        "PRODUCER_REDIS_PASSWORD": sentinels.PASSWORD,
        "PRODUCER_REDIS_SENTINEL_PASSWORD": sentinels.SENTINEL_PASSWORD,
        "PRODUCER_REDIS_TLS": "true",
        "PRODUCER_REDIS_TLS_CA_FILE": tls.ca,
    }
    worker = ProducerProcess("--metrics-port", str(port), "--metrics-host", "127.0.0.1", env=env)
    channel = f"{hub.url}/v1/channels/tls/events"
    try:
        hub.start()
        worker.start()
        async with aiohttp.ClientSession() as session:
            await wait_http_ok(session, f"{hub.url}/readyz", why=hub.log)
            await wait_http_ok(session, f"http://127.0.0.1:{port}/readyz", why=worker.log)
            async with session.post(channel, json=[{"data": "one"}, {"data": "two"}]) as resp:
                assert resp.status == 201, await resp.text()
            async with session.get(channel, headers={"Last-Event-ID": "0"}) as resp:
                assert resp.status == 200
                assert [e.data for e in await collect(resp, count=2)] == ["one", "two"]
            await _generate(session, hub, worker)

            old = sentinels.kill_primary()
            deadline = time.monotonic() + 60
            while sentinels.primary_port() == old:
                assert time.monotonic() < deadline, "Sentinels promoted no replica"
                await asyncio.sleep(0.2)
            await wait_http_ok(session, f"{hub.url}/readyz", timeout_s=60, why=hub.log)
            await wait_http_ok(session, f"http://127.0.0.1:{port}/readyz", timeout_s=60, why=worker.log)
            deadline = time.monotonic() + 30
            while True:  # the hub's pooled connections to the old primary fail once each, then it is found anew
                async with session.post(channel, json=[{"data": "three"}], headers={"Idempotency-Key": "3"}) as resp:
                    if resp.status == 201:
                        break
                    assert resp.status == 503 and time.monotonic() < deadline, await resp.text()
                await asyncio.sleep(0.2)
            async with session.get(channel, headers={"Last-Event-ID": "0"}) as resp:
                async with asyncio.timeout(10):
                    async for event in read_events(resp):  # after the events the new primary has (a reset if not all)
                        if event.data == "three":
                            break
            await _generate(session, hub, worker)
        logs = hub.log() + worker.log()
        assert "over TLS" in hub.log()
        for password in (sentinels.PASSWORD, sentinels.SENTINEL_PASSWORD, "hub-app-secret"):
            assert password not in logs
    finally:
        hub.close()
        worker.close()


async def _generate(session: aiohttp.ClientSession, hub: HubProcess, worker: ProducerProcess) -> None:
    """A demo generation, taken from the queue by the worker and run to its one terminal event."""
    names = await run_demo_generation(session, hub.url, 5)
    assert names == ["start"] + ["token"] * 5 + ["done"], (names, worker.log()[-3000:])


def _exit_line(module: str, args: list[str]) -> str:
    """The one line on stderr of `python -m <module> <args>`, which must exit with status 2."""
    prefix = f"{module.upper()}_"
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


SENTINELS = ["--redis-sentinels", "127.0.0.1:1", "--redis-sentinel-master", "m"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "message"),
    [
        # The Sentinel form's flags, with a URL: the URL says it all (user, password, TLS by rediss://).
        (["--redis-url", "redis://127.0.0.1:1/0", "--redis-tls"], "--redis-tls (HUB_REDIS_TLS): with --redis-url, TLS"),
        (["--redis-url", "redis://127.0.0.1:1/0", "--redis-username", "u"], "--redis-username (HUB_REDIS_USERNAME)"),
        (
            ["--redis-url", "redis://127.0.0.1:1/0", "--redis-sentinel-password", "pw"],
            "--redis-sentinel-password (HUB_REDIS_SENTINEL_PASSWORD): needs --redis-sentinels",
        ),
        (["--redis-sentinel-password", "pw"], "--redis-sentinel-password (HUB_REDIS_SENTINEL_PASSWORD): needs"),
        # TLS files where no TLS is used: they would be ignored, and the connection would go in clear.
        (
            ["--redis-url", "redis://127.0.0.1:1/0", "--redis-tls-ca-file", "{ca}"],
            "--redis-tls-ca-file (HUB_REDIS_TLS_CA_FILE): needs TLS: a rediss:// URL",
        ),
        ([*SENTINELS, "--redis-tls-ca-file", "{ca}"], "--redis-tls-ca-file (HUB_REDIS_TLS_CA_FILE): needs --redis-tls"),
        (["--redis-tls-ca-file", "{ca}"], "--redis-tls-ca-file (HUB_REDIS_TLS_CA_FILE): needs TLS to Redis"),
        # The files themselves, read at start.
        (
            [*SENTINELS, "--redis-tls", "--redis-tls-ca-file", "{dir}/missing.pem"],
            "--redis-tls-ca-file (HUB_REDIS_TLS_CA_FILE): cannot read {dir}/missing.pem (No such file or directory)",
        ),
        (
            ["--redis-url", "rediss://127.0.0.1:1/0", "--redis-tls-ca-file", "{client_key}"],
            "--redis-tls-ca-file (HUB_REDIS_TLS_CA_FILE): {client_key} holds no PEM certificate",
        ),
        (
            ["--redis-url", "rediss://127.0.0.1:1/0", "--redis-tls-cert-file", "{client_cert}"],
            "--redis-tls-cert-file (HUB_REDIS_TLS_CERT_FILE): needs --redis-tls-key-file",
        ),
        (
            ["--redis-url", "rediss://127.0.0.1:1/0", "--redis-tls-cert-file", "{client_cert}"]
            + ["--redis-tls-key-file", "{server_key}"],
            "--redis-tls-key-file (HUB_REDIS_TLS_KEY_FILE): {server_key} is not the unencrypted PEM private key",
        ),
    ],
)
def test_wrong_redis_tls_and_sentinel_settings_stop_the_hub_with_one_line(
    tls: TlsFiles, args: list[str], message: str
) -> None:
    paths = {
        "dir": str(Path(tls.ca).parent),
        "ca": tls.ca,
        "client_cert": tls.client_cert,
        "client_key": tls.client_key,
        "server_key": tls.server_key,
    }
    line = _exit_line("hub", [*(a.format(**paths) for a in args), "--anonymous"])
    assert message.format(**paths) in line


@pytest.mark.e2e
def test_the_worker_checks_the_same_redis_tls_settings(tls: TlsFiles) -> None:
    line = _exit_line("producer", [*SENTINELS, "--redis-tls-key-file", tls.client_key])
    assert "--redis-tls-key-file (PRODUCER_REDIS_TLS_KEY_FILE): needs --redis-tls" in line
    line = _exit_line("producer", [*SENTINELS, "--redis-tls", "--redis-tls-key-file", tls.client_key])
    assert "--redis-tls-key-file (PRODUCER_REDIS_TLS_KEY_FILE): needs --redis-tls-cert-file" in line
