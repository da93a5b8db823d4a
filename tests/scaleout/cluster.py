"""The scale-out topology of tests/scaleout: hub nodes on one redis-server, a demo worker, and nginx in front of the
nodes, configured by deploy/nginx/hub.conf itself (only its listen address and node list filled in, its log moved)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ssecore.backend import Entry
from ssecore.backend_redis import RedisBackend
from tests.processes import alive, children, stop_process
from tests.support import (
    ROOT,
    HubProcess,
    ProducerProcess,
    RedisServer,
    ResumingClient,
    free_port,
    wait_http_ok,
)

__all__ = [
    "HUB_CONF",
    "Cluster",
    "LoadBalancer",
    "assert_exact",
    "fail_timeout_s",
    "find_nginx",
    "metric",
    "render_hub_conf",
    "submit",
    "until",
]

HUB_CONF = ROOT / "deploy" / "nginx" / "hub.conf"

# The settings every node of these tests runs with. The limits are raised because every test client comes from one
# address (and through the proxy); a short retry hint and heartbeat keep the tests short; grace 4 s drains a node's
# streams over 2 s.
GRACE_S = 4.0
RETRY_MS = 250
NODE_FLAGS = (
    "--heartbeat",
    "2",
    "--retry-ms",
    str(RETRY_MS),
    "--grace",
    str(GRACE_S),
    "--trusted-proxies",
    "127.0.0.1",
    "--max-streams-per-client",
    "100000",
    "--max-generations-per-client",
    "100000",
    "--publish-rate",
    "100000",
    "--publish-burst",
    "100000",
    "--log-level",
    "warning",
)

# What the test adds around the deployment file: the process-wide settings a system nginx.conf would hold, with
# every path in a temporary directory so that nginx runs as any user without touching /etc/nginx.
_MAIN_CONF = """\
worker_processes 2;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/hub.conf;
}}
"""


def find_nginx() -> str | None:
    """Debian puts nginx in /usr/sbin, which an ordinary user's PATH lacks."""
    exe = shutil.which("nginx")
    if exe is None and os.access("/usr/sbin/nginx", os.X_OK):
        exe = "/usr/sbin/nginx"
    return exe


def render_hub_conf(listen: str, nodes: Sequence[str], log_dir: Path) -> str:
    """deploy/nginx/hub.conf with @LISTEN@ filled in and its @NODE@ line repeated once per node, its access log in
    `log_dir`; comments as they are (they name the placeholders)."""
    out: list[str] = []
    for line in HUB_CONF.read_text().splitlines():
        if line.lstrip().startswith("#"):
            out.append(line)
        elif "@NODE@" in line:
            out += [line.replace("@NODE@", node) for node in nodes]
        else:
            out.append(line.replace("@LISTEN@", listen).replace("/var/log/nginx/", f"{log_dir}/"))
    code = "\n".join(line.split("#", 1)[0] for line in out)
    if re.search(r"@[A-Z_]+@", code):
        raise ValueError(f"{HUB_CONF}: a placeholder was left unfilled")
    return "\n".join(out) + "\n"


def fail_timeout_s() -> float:
    """How long nginx skips a node after a failed attempt (the `fail_timeout` of the deployment file)."""
    m = re.search(r"^\s*server @NODE@ .*fail_timeout=(\d+)s", HUB_CONF.read_text(), re.MULTILINE)
    assert m is not None, f"{HUB_CONF}: no fail_timeout on the node line"
    return float(m.group(1))


class LoadBalancer:
    """nginx on a free loopback port in front of `nodes` (host:port), with its files in a directory of its own."""

    def __init__(self, nodes: Sequence[str]) -> None:
        exe = find_nginx()
        if exe is None:
            raise RuntimeError("nginx is not installed (make test installs it)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hub-test-nginx-"))
        # Started as root, nginx runs its workers as `nobody`, who must be able to enter this directory.
        self.dir.chmod(0o755)
        (self.dir / "hub.conf").write_text(render_hub_conf(f"127.0.0.1:{self.port}", nodes, self.dir))
        (self.dir / "nginx.conf").write_text(_MAIN_CONF.format(dir=self.dir))
        self.args = [exe, "-p", str(self.dir), "-e", str(self.dir / "error.log"), "-c", str(self.dir / "nginx.conf")]
        self.proc: subprocess.Popen[bytes] | None = None
        self.workers: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.dir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while len(self.workers) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start:\n{self.log_tail()}")
            time.sleep(0.05)
            self.workers = children(self.proc.pid)
        # The workers are up, but the port may still be opening.
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx is not listening:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def reload(self, nodes: Sequence[str], timeout_s: float = 20) -> None:
        """Re-render hub.conf for `nodes` and reload nginx (SIGHUP to this master): new workers take new requests,
        the old ones finish the streams they carry and exit. The file is checked first, because a reload with a bad
        file is only logged and nginx goes on with the old one."""
        assert self.proc is not None and self.proc.poll() is None, "nginx is not running"
        (self.dir / "hub.conf").write_text(render_hub_conf(f"127.0.0.1:{self.port}", nodes, self.dir))
        check = subprocess.run([*self.args, "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stdout}{check.stderr}")
        old = set(children(self.proc.pid))
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while len(new := [p for p in children(self.proc.pid) if p not in old]) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not reload:\n{self.log_tail()}")
            time.sleep(0.05)
        # Only the new ones are remembered for `close`: the old ones exit once their streams end, and a PID kept after
        # that could name another process by then. Until they exit they are the master's children, which the master's
        # SIGTERM in `close` ends, and the master exits only after all of its children.
        self.workers = new

    def access_log(self) -> list[str]:
        try:
            return (self.dir / "access.log").read_text(errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self, lines: int = 30) -> str:
        parts: list[str] = []
        for name in ("stdout.log", "error.log"):
            try:
                parts += (self.dir / name).read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(parts)

    def close(self) -> None:
        """Stop the master (SIGTERM: nginx's fast shutdown; a graceful one would wait for every stream), then make
        sure its workers went too: a worker outlives a master that was killed."""
        stop_process(self.proc)
        for pid in self.workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


async def metric(session: aiohttp.ClientSession, node: HubProcess, sample: str, default: float | None = None) -> float:
    """One sample of a node's /metrics (`name` or `name{label="value"}`), read from the node itself, not through
    the balancer. A labelled sample exists only once counted: `default` stands in for it then."""
    async with session.get(f"{node.url}/metrics") as resp:
        text = await resp.text()
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    if m is None and default is not None:
        return default
    assert m is not None, f"{sample} not in {node.url}/metrics"
    return float(m.group(1))


def assert_exact(client: ResumingClient, entries: Sequence[Entry]) -> None:
    """The client received exactly the channel's entries: each once, in order, with its id, name and data."""
    got = [(e.id, e.event, e.data) for e in client.events]
    want = [(e.id, e.event, e.data) for e in entries]
    if got != want:
        ids = [g[0] for g in got]
        dupes = len(ids) - len(set(ids))
        missing = [w[0] for w in want if w[0] not in set(ids)]
        raise AssertionError(
            f"{client.url}: {len(got)} events, expected {len(want)}; {dupes} duplicated, {len(missing)} missing "
            f"(first missing {missing[:3]}); attempts {client.attempts}"
        )


class Cluster:
    """Three hub nodes on one redis-server (a key prefix of their own), a demo worker, nginx in front. Nodes can be
    killed, stopped and started again on the same port; `close` ends every process this started."""

    def __init__(
        self,
        redis: RedisServer,
        *,
        nodes: int = 3,
        tokens_per_s: float = 20.0,
        node_flags: Sequence[str] = (),
        worker_env: dict[str, str] | None = None,
    ) -> None:
        """`worker_env`: the worker's environment beside the test's (the providers' keys and URLs)."""
        self.redis = redis
        self.prefix = f"so{uuid.uuid4().hex[:8]}:"
        common = ("--redis-url", redis.url, "--key-prefix", self.prefix)
        self._node_args = (*common, *NODE_FLAGS, *node_flags)
        self.nodes = [HubProcess(*self._node_args) for _ in range(nodes)]
        self.worker = ProducerProcess(
            *common,
            "--metrics-port",
            "0",
            "--demo-tokens-per-s",
            str(tokens_per_s),
            "--log-level",
            "warning",
            env=worker_env,
        )
        self.lb = LoadBalancer([f"127.0.0.1:{n.port}" for n in self.nodes])
        self.backend = RedisBackend(redis.url, prefix=self.prefix, history=10_000, ttl_s=3600, timeout_s=5)

    @property
    def url(self) -> str:
        return self.lb.url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.worker.start()
        self.lb.start()

    async def wait_ready(self, node: HubProcess, session: aiohttp.ClientSession, timeout_s: float = 20) -> None:
        await wait_http_ok(session, f"{node.url}/readyz", timeout_s=timeout_s, why=lambda: node.log()[-2000:])

    async def scale_up(self, session: aiohttp.ClientSession) -> HubProcess:
        """Start one more node like the others and, once it is ready, reload nginx with it in the node list."""
        node = HubProcess(*self._node_args)
        self.nodes.append(node)
        await asyncio.to_thread(node.start)
        await self.wait_ready(node, session)
        await asyncio.to_thread(self.lb.reload, [f"127.0.0.1:{n.port}" for n in self.nodes])
        return node

    def kill(self, node: HubProcess) -> None:
        """kill -9: no drain, every connection of the node reset by the kernel."""
        assert node.proc is not None
        node.proc.kill()
        node.wait(10)

    async def entries(self, channel: str) -> list[Entry]:
        """Everything the channel holds, read from Redis."""
        out: list[Entry] = []
        pos = "0"
        while True:
            r = await self.backend.range(channel, pos, limit=1000)
            out += r.entries
            if not r.more:
                return out
            pos = out[-1].id

    def logs(self) -> str:
        parts = [f"--- node {n.port}\n{n.log()[-1500:]}" for n in self.nodes]
        parts.append(f"--- worker\n{self.worker.log()[-1500:]}")
        parts.append(f"--- nginx\n{self.lb.log_tail()}")
        return "\n".join(parts)

    async def aclose(self) -> None:
        self.lb.close()
        self.worker.close()
        for node in self.nodes:
            node.close()
        await self.backend.aclose()


async def submit(session: aiohttp.ClientSession, url: str, tokens: int) -> dict[str, str]:
    """Start a demo generation of `tokens` tokens through the balancer: {"id", "channel", "events_url"}."""
    body = {"provider": "demo", "model": f"demo:{tokens}", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{url}/v1/generations", json=body) as resp:
        job: dict[str, str] = await resp.json()
        assert resp.status == 202, job
    return job


async def until(done: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@dataclass
class Publisher:
    """Publishes one event per request through the balancer at a fixed rate, round robin over `channels`; a request
    that fails is sent again. A 503 stored nothing, and a request nginx could not hand to a node never reached one:
    the tests' check of each channel against the acknowledged ids would catch a publish stored twice."""

    session: aiohttp.ClientSession
    url: str
    channels: list[str]
    rate_per_s: float
    acked: dict[str, list[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        n = 0
        while not stop.is_set():
            channel = self.channels[n % len(self.channels)]
            await self.publish(channel, [{"event": "tick", "data": str(len(self.acked.get(channel, [])))}])
            n += 1
            # A fixed schedule, not a fixed pause: a slow request does not lower the rate.
            await asyncio.sleep(max(0.0, started + n / self.rate_per_s - time.monotonic()))

    async def publish(self, channel: str, body: list[dict[str, object]]) -> None:
        while True:
            try:
                async with self.session.post(f"{self.url}/v1/channels/{channel}/events", json=body) as resp:
                    if resp.status == 201:
                        self.acked.setdefault(channel, []).extend((await resp.json())["ids"])
                        return
                    self.failures.append(f"{resp.status} {await resp.text()}")
            except aiohttp.ClientError as e:
                self.failures.append(repr(e))
            await asyncio.sleep(0.05)


async def end_channels(publisher: Publisher, channels: Sequence[str], clients: Sequence[asyncio.Task[None]]) -> None:
    """Publish each channel's close marker and wait until every client has ended: each reconnects after the marker
    and gets the 204 that ends it."""
    for ch in channels:
        await publisher.publish(ch, [{"event": "end", "data": "", "close": True}])
    async with asyncio.timeout(30):
        await asyncio.gather(*clients)


@dataclass
class Load:
    """Clients streaming and a Publisher feeding them, for a test that does something to the nodes meanwhile:
    `publish` once every client is owed every event, then `finish` (stop publishing, end every channel, wait for
    every client), or `abandon` when the test fails part-way."""

    publisher: Publisher
    channels: Sequence[str]
    clients: Sequence[asyncio.Task[None]]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    publishing: asyncio.Task[None] | None = None

    def publish(self) -> None:
        self.publishing = asyncio.create_task(self.publisher.run(self.stop))

    async def finish(self) -> None:
        self.stop.set()
        if self.publishing is not None:
            await self.publishing
        await end_channels(self.publisher, self.channels, self.clients)

    def abandon(self) -> None:
        self.stop.set()
        for t in [*self.clients, *([self.publishing] if self.publishing is not None else [])]:
            t.cancel()
