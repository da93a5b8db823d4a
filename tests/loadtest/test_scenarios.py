"""The `reconnect-storm` and `generations` scenarios end to end, small: a real Redis, a real hub process on it, and
`python -m loadtest` as a user runs it. The figures are checked for exactness and for being there, never for speed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from loadtest.__main__ import settings_from_args
from tests.loadtest.test_cli import LOAD_FLAGS
from tests.support import ROOT, HubProcess, RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def node(redis_server: RedisServer) -> Iterator[tuple[HubProcess, RedisServer]]:
    hub = HubProcess(*LOAD_FLAGS, "--log-level", "warning", "--redis-url", redis_server.url)
    hub.start()
    yield hub, redis_server
    hub.close()


def _loadtest(args: list[str], out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", *args, "--workers", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    result: dict[str, Any] = orjson.loads(out.read_bytes())
    assert result["ok"] is True and result["problems"] == []
    return result


def _exact(d: dict[str, Any], subscribers: int) -> None:
    assert (d["missing"], d["gaps"], d["duplicates"], d["out_of_order"], d["beyond"]) == (0, 0, 0, 0, 0)
    assert (d["unexpected"], d["resets"], d["publish_errors"]) == (0, 0, 0)
    assert d["subscribers"] == d["complete_subscribers"] == subscribers
    assert d["published"] > 0 and d["delivered"] == d["expected"]


@pytest.mark.e2e
@pytest.mark.slow
def test_reconnect_storm_resumes_every_stream_exactly_and_counts_its_cost(
    node: tuple[HubProcess, RedisServer], tmp_path: Path
) -> None:
    hub, redis = node
    assert hub.proc is not None
    args = ["reconnect-storm", "--url", hub.url, "--connections", "200", "--channels", "20", "--rate", "100"]
    args += ["--duration", "4", "--redis-url", redis.url, "--metrics-url", f"{hub.url}/metrics"]
    r = _loadtest([*args, "--pid", str(hub.proc.pid)], tmp_path / "storm.json")
    storm = r["storm"]
    assert (storm["reconnected"], storm["reconnect_failed"]) == (200, 0)
    assert (storm["caught_up"], storm["not_caught_up"]) == (200, 0)
    assert storm["catch_up_ms"]["samples"] == 200
    # Every resume came back within the lingering channels' windows: none of them read the store.
    assert (storm["resumes_from_window"], storm["resumes_from_store"], storm["hub_store_reads"]) == (200, 0, 0)
    assert storm["store_history_reads"] == 0
    assert storm["store_commands_by_command"]  # the tokens went on flowing during the storm, and were counted
    # The reconnected streams continued the same delivery records: the storm lost and repeated nothing.
    _exact(r["delivery"], 200)


@pytest.mark.e2e
@pytest.mark.slow
def test_generations_append_like_producers_and_every_token_arrives(
    node: tuple[HubProcess, RedisServer], tmp_path: Path
) -> None:
    hub, redis = node
    args = ["generations", "--url", hub.url, "--connections", "100", "--channels", "100", "--rate", "1000"]
    args += ["--duration", "3", "--redis-url", redis.url]
    r = _loadtest(args, tmp_path / "gen.json")
    d = r["delivery"]
    _exact(d, 100)
    assert d["published"] == 3000  # 10 tokens a second for 3 s on each of 100 channels, all stored
    assert r["latency_ms"]["samples"] == d["delivered"]


def test_generations_without_redis_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="--redis-url"):
        settings_from_args(["generations"], {})
