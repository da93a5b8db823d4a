"""Test helpers: real hub, worker, Redis Cluster and Sentinel processes on free loopback ports (on tests.processes);
an SSE reader on the project's parser."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ssecore.backend import Backend, Entry
from ssecore.jobs import GenerationRecord, JobQueue
from ssecore.sse import SSEEvent, SSEParser
from tests.processes import RedisServer as RedisServer  # re-exported, as most tests take their servers from here
from tests.processes import Service, wait_port
from tests.processes import free_port as free_port  # re-exported, as most tests take their ports from here

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess(Service):
    """A real `python -m <module>` process (hub or producer) with its output in a temporary log file; `close` kills it
    and removes the log."""

    module = ""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        log_path = Path(tempfile.mkstemp(prefix=f"{self.module}-test-", suffix=".log")[1])
        super().__init__(self.module, [], log_path, cwd=ROOT, env={**os.environ, **(env or {})})
        self.args = args

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        self.log_path.unlink(missing_ok=True)


class HubProcess(ServiceProcess):
    """A real `python -m hub` process on a free port (anonymous unless the test configures authentication)."""

    module = "hub"

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env={"HUB_ANONYMOUS": "1", **(env or {})})
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [*super().command(), "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self) -> None:
        super().start()
        wait_port(self.port, 20, self.proc)


class ProducerProcess(ServiceProcess):
    """A real `python -m producer` worker process."""

    module = "producer"


async def read_events(resp: aiohttp.ClientResponse) -> AsyncIterator[SSEEvent]:
    """The events of an SSE response, as the project's WHATWG parser reads them, until the response ends."""
    parser = SSEParser()
    async for chunk in resp.content.iter_any():
        for ev in parser.feed(chunk):
            yield ev


async def collect(resp: aiohttp.ClientResponse, *, count: int | None = None, timeout_s: float = 10) -> list[SSEEvent]:
    """Read events until `count` arrived or the response ended (count None), within `timeout_s`."""
    out: list[SSEEvent] = []
    async with asyncio.timeout(timeout_s):
        async for ev in read_events(resp):
            out.append(ev)
            if count is not None and len(out) >= count:
                break
    return out


async def settled(queue: JobQueue, job_id: str, timeout_s: float = 10) -> GenerationRecord:
    """A generation's final record. The worker settles it just after appending the end marker, so a reader who saw
    the channel close may still find it running for a moment."""
    deadline = time.monotonic() + timeout_s
    while (record := await queue.get(job_id)) is None or record.status in ("queued", "running"):
        assert time.monotonic() < deadline, f"{job_id} not settled: {record}"
        await asyncio.sleep(0.02)
    return record


@dataclass(slots=True)
class Attempt:
    """One connection of a ResumingClient, with monotonic times: when it was asked for, when its response head
    arrived, its first event, and when it ended (cleanly, or with `error`)."""

    sent: float
    last_event_id: str
    status: int | None = None
    opened: float | None = None
    first_event: float | None = None
    ended: float | None = None
    events: int = 0
    error: str | None = None


class ResumingClient:
    """An SSE client that behaves like EventSource where the tests need it to: after a response ends or its
    connection drops it waits the stream's `retry:` hint and reconnects with `Last-Event-ID` (the last id it saw, an
    id-only block included); a 204 ends it for good. It keeps every event in arrival order and every attempt, so a
    test can check the exact sequence across reconnects and time each one.

    Unlike EventSource it also reconnects after an error status (recorded in `attempts`): a test sees the failure
    instead of waiting for a client that gave up.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        last_event_id: str = "",
        retry_s: float = 1.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 100,
    ) -> None:
        self.session = session
        self.url = url
        self.last_event_id = last_event_id
        self.retry_s = retry_s  # until the stream says otherwise (retry:)
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max_attempts
        self.events: list[SSEEvent] = []
        self.attempts: list[Attempt] = []
        self.opened = asyncio.Event()  # the first response is open: its position is fixed, later events will come
        self.finished = False  # a 204: the channel is finished and this client has all of it

    async def run(self) -> None:
        """Stream until a 204; raises when `max_attempts` connections did not get there."""
        while len(self.attempts) < self.max_attempts:
            attempt = Attempt(sent=time.monotonic(), last_event_id=self.last_event_id)
            self.attempts.append(attempt)
            try:
                await self._connect(attempt)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                attempt.error = repr(e)
            attempt.ended = time.monotonic()
            if self.finished:
                return
            await asyncio.sleep(self.retry_s)
        raise RuntimeError(f"{self.url}: not finished after {self.max_attempts} connections: {self.attempts[-3:]}")

    async def _connect(self, attempt: Attempt) -> None:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout_s)
        async with self.session.get(self.url, headers=headers, timeout=timeout) as resp:
            attempt.status = resp.status
            attempt.opened = time.monotonic()
            if resp.status == 204:
                self.finished = True
                return
            if resp.status != 200:
                attempt.error = f"status {resp.status}: {(await resp.text())[:200]}"
                return
            self.opened.set()
            parser = SSEParser()
            parser.last_event_id = self.last_event_id  # EventSource keeps it across connections
            async for chunk in resp.content.iter_any():
                events = parser.feed(chunk)
                if events and attempt.first_event is None:
                    attempt.first_event = time.monotonic()
                attempt.events += len(events)
                self.events += events
                self.last_event_id = parser.last_event_id
                if parser.retry_ms is not None:
                    self.retry_s = parser.retry_ms / 1000


async def run_demo_generation(session: aiohttp.ClientSession, hub_url: str, tokens: int) -> list[str]:
    """Start a demo generation of `tokens` tokens on the hub and follow it, resuming, to its end: its event names."""
    body = {"provider": "demo", "model": f"demo:{tokens}", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{hub_url}/v1/generations", json=body) as resp:
        job = await resp.json()
        assert resp.status == 202, job
    generation = ResumingClient(session, f"{hub_url}{job['events_url']}?last_event_id=0", retry_s=0.2)
    async with asyncio.timeout(60):
        await generation.run()
    return [e.event for e in generation.events]


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too; so at most 55535."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """A real Redis Cluster of three masters (no replicas) on free loopback ports, made with `redis-cli --cluster`."""

    # Password-protected, as managed clusters are: every connection the hub makes to any node must authenticate.
    PASSWORD = "cluster-secret"

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--repl-diskless-sync-delay", "0")
        auth = ("--requirepass", self.PASSWORD, "--masterauth", self.PASSWORD)
        self.replicas = replicas
        self.servers = [RedisServer(*args, *auth) for _ in range(masters * (1 + replicas))]
        for server in self.servers:
            server.port = _cluster_port()

    @property
    def url(self) -> str:
        """Any node's URL (with the password): the client learns the others from it."""
        return f"redis://:{self.PASSWORD}@127.0.0.1:{self.servers[0].port}/0"

    def cli(self, port: int, *args: str) -> str:
        """redis-cli against one node, authenticated; its output, stripped."""
        cmd = ["redis-cli", "-p", str(port), "-a", self.PASSWORD, "--no-auth-warning", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    def start(self) -> None:
        for server in self.servers:
            server.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (make test installs redis-server, which brings it)")
        nodes = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run(
            [cli, "-a", self.PASSWORD, "--no-auth-warning", "--cluster", "create", *nodes]
            + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        for server in self.servers:
            while True:
                info = self.cli(server.port, "cluster", "info")
                # A replica that has not finished its first sync would refuse to fail over (its data "too old").
                replication = self.cli(server.port, "info", "replication")
                synced = "role:master" in replication or "master_link_status:up" in replication
                if "cluster_state:ok" in info and synced:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster not ok on {server.port}: {info}\n{replication}")
                time.sleep(0.1)

    def close(self) -> None:
        for server in self.servers:
            server.close()


class RedisSentinels:
    """A password-protected Redis primary with replicas, watched by three Sentinels (quorum 2) that call it down
    after a second and promote a replica; on free loopback ports."""

    MASTER = "m"
    PASSWORD = "sentinel-secret"

    def __init__(
        self,
        replicas: int = 2,
        extra: tuple[str, ...] = (),
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        """`extra`: more options of the primary and the replicas. `down_after_ms`: how long a server may not answer
        before it is called down; `failover_timeout_ms`: how long a failover may take before the Sentinels try
        another (each may promote a replica while one promoted before still takes writes)."""
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        auth = ("--requirepass", self.PASSWORD, "--masterauth", self.PASSWORD, "--repl-diskless-sync-delay", "0")
        self.primary = RedisServer(*auth, *extra)
        self.replicas = [
            RedisServer(*auth, *extra, "--replicaof", "127.0.0.1", str(self.primary.port)) for _ in range(replicas)
        ]
        self.sentinels = [RedisServer("--sentinel") for _ in range(3)]

    def hub_args(self) -> tuple[str, ...]:
        """The flags that put a hub on these Sentinels (the password goes by environment variable)."""
        return ("--redis-sentinels", self.addresses, "--redis-sentinel-master", self.MASTER)

    @property
    def addresses(self) -> str:
        """The Sentinels as --redis-sentinels takes them."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def cli(self, port: int, *args: str, password: str | None = None) -> str:
        auth = ["-a", password, "--no-auth-warning"] if password else []
        cmd = ["redis-cli", "-p", str(port), *auth, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    def primary_port(self) -> int:
        """The primary's port as the first Sentinel names it."""
        return int(self.cli(self.sentinels[0].port, "sentinel", "get-master-addr-by-name", self.MASTER).split()[1])

    def start(self) -> None:
        self.primary.start()
        for replica in self.replicas:
            replica.start()
        for sentinel in self.sentinels:
            sentinel.config = os.path.join(sentinel.dir, "sentinel.conf")
            Path(sentinel.config).write_text(
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel auth-pass {self.MASTER} {self.PASSWORD}\n"
                f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER} {self.failover_timeout_ms}\n"
            )
            sentinel.start()
        # Ready when every replica has synced and every Sentinel knows the replicas and the other Sentinels: a
        # failover needs both (the replicas are learnt from the primary, the Sentinels from each other's hellos).
        deadline = time.monotonic() + 60
        for sentinel in self.sentinels:
            while True:
                replicas = self.cli(sentinel.port, "sentinel", "replicas", self.MASTER).count("flags\nslave")
                others = self.cli(sentinel.port, "sentinel", "sentinels", self.MASTER).count("flags\nsentinel")
                synced = all(
                    "master_link_status:up" in self.cli(r.port, "info", "replication", password=self.PASSWORD)
                    for r in self.replicas
                )
                if replicas == len(self.replicas) and others == len(self.sentinels) - 1 and synced:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Sentinel on {sentinel.port} sees {replicas} replicas, {others} Sentinels")
                time.sleep(0.2)

    def switches(self) -> int:
        """How many failovers the Sentinels have made: the master's configuration epoch, which each one raises (the
        highest any Sentinel knows)."""
        epochs = []
        for sentinel in self.sentinels:
            fields = self.cli(sentinel.port, "sentinel", "master", self.MASTER).split("\n")
            epochs.append(int(fields[fields.index("config-epoch") + 1]))
        return max(epochs)

    def kill_primary(self) -> int:
        """kill -9 the current primary; its port."""
        port = self.primary_port()
        [server] = [s for s in (self.primary, *self.replicas) if s.port == port]
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        server.proc = None
        return port

    def close(self) -> None:
        for server in (*self.sentinels, self.primary, *self.replicas):
            server.close()


async def wait_http_ok(
    session: aiohttp.ClientSession, url: str, *, timeout_s: float = 20, why: Callable[[], str] = lambda: ""
) -> None:
    """Poll `url` until it answers 200 (a process's readiness); past `timeout_s`, fail with `why()` (its log, say)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"{url} not ready:\n{why()}"
        await asyncio.sleep(0.05)


async def stored_entries(backend: Backend, channel: str) -> list[Entry]:
    """Everything the channel holds, read from the store page by page."""
    out: list[Entry] = []
    pos = "0"
    while True:
        r = await backend.range(channel, pos, limit=1000)
        out += r.entries
        if not r.more:
            return out
        pos = out[-1].id


# -- TLS: throw-away certificates, and Redis servers and Sentinels that speak only TLS --------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files made for one test: a CA, a server certificate it signed (for 127.0.0.1 and localhost), a client
    certificate it signed, and another CA, which signed neither."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str

    def server_args(self) -> tuple[str, ...]:
        """redis-server's TLS options for these files (clients' certificates checked against the CA when asked)."""
        return ("--tls-cert-file", self.server_cert, "--tls-key-file", self.server_key, "--tls-ca-cert-file", self.ca)


def make_tls_files(directory: str) -> TlsFiles:
    """Write a fresh CA and the certificates it signs into `directory` (keys unencrypted, valid for a day)."""
    now = datetime.datetime.now(datetime.UTC)

    def write(name: str, data: bytes) -> str:
        path = os.path.join(directory, name)
        Path(path).write_bytes(data)
        return path

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def certificate(
        cn: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None
    ) -> x509.CertificateBuilder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer_name, issuer_key = issuer or (name, key)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        )

    def ca(cn: str) -> tuple[x509.Name, ec.EllipticCurvePrivateKey, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            certificate(cn, key, None)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # certificate and CRL signing only
            .sign(key, hashes.SHA256())
        )
        return cert.subject, key, cert.public_bytes(serialization.Encoding.PEM)

    def leaf(cn: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey], server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = certificate(cn, key, issuer).add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if server:  # Redis servers connect to one another with this certificate too: client and server use
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(issuer[1], hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    ca_name, ca_key, ca_pem = ca("hub-test-ca")
    server_cert, server_key = leaf("hub-test-redis", (ca_name, ca_key), server=True)
    client_cert, client_key = leaf("hub-test-client", (ca_name, ca_key), server=False)
    return TlsFiles(
        ca=write("ca.pem", ca_pem),
        server_cert=write("server.pem", server_cert),
        server_key=write("server-key.pem", server_key),
        client_cert=write("client.pem", client_cert),
        client_key=write("client-key.pem", client_key),
        other_ca=write("other-ca.pem", ca("hub-test-other-ca")[2]),
    )


def tls_only(server: RedisServer, tls: TlsFiles, *extra: str) -> RedisServer:
    """`server`, made to listen for TLS alone on its port (no plain TCP), with `extra` redis-server options."""
    server.extra = (*server.extra, "--port", "0", "--tls-port", str(server.port), *tls.server_args(), *extra)
    return server


class TlsRedisSentinels(RedisSentinels):
    """RedisSentinels over TLS alone: clients, replication, and the Sentinels' own connections to the servers and to
    one another. The Sentinels also take a password of their own (requirepass), given to each other as
    `sentinel sentinel-pass`. Clients present no certificate."""

    SENTINEL_PASSWORD = "sentinels-own-secret"

    def __init__(self, tls: TlsFiles, replicas: int = 1) -> None:
        super().__init__(replicas)
        self.tls = tls
        both = ("--tls-replication", "yes", "--tls-auth-clients", "no")
        for server in (self.primary, *self.replicas):
            tls_only(server, tls, *both)
        for sentinel in self.sentinels:
            tls_only(sentinel, tls, *both, "--requirepass", self.SENTINEL_PASSWORD)
            sentinel.extra += ("--sentinel", "sentinel-pass", self.SENTINEL_PASSWORD)

    def cli(self, port: int, *args: str, password: str | None = None) -> str:
        if password is None and port in {s.port for s in self.sentinels}:
            password = self.SENTINEL_PASSWORD
        cmd = ["redis-cli", "--tls", "--cacert", self.tls.ca, "-p", str(port)]
        cmd += ["-a", password, "--no-auth-warning"] if password else []
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
