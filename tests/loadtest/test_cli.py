"""`python -m loadtest` end to end against a real hub process, and its settings: flags, environment, file limits."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from loadtest.__main__ import fd_limit_problem, main, settings_from_args
from loadtest.scenario import SCENARIOS
from loadtest.settings import LoadSettings
from tests.support import ROOT, HubProcess

# Limits that would otherwise throttle one load-test client; the hub's defaults are per publisher and per IP.
LOAD_FLAGS = (
    "--publish-rate",
    "1000000",
    "--publish-burst",
    "1000000",
    "--publish-bytes-rate",
    "1000000000",
    "--publish-bytes-burst",
    "1000000000",
    "--max-streams-per-client",
    "1000000",
)


@pytest.fixture
def hub() -> Iterator[HubProcess]:
    node = HubProcess(*LOAD_FLAGS, "--log-level", "warning")
    node.start()
    yield node
    node.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_fanout_run_accounts_for_every_event_exactly(hub: HubProcess, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    md = tmp_path / "out.md"
    png = tmp_path / "out.png"
    assert hub.proc is not None
    args = ["fanout", "--url", hub.url, "--connections", "200", "--channels", "10", "--rate", "100"]
    args += ["--duration", "3", "--workers", "2", "--pid", str(hub.proc.pid), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", *args, "--markdown", str(md), "--plot", str(png)],
        cwd=ROOT,
        capture_output=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    r = orjson.loads(out.read_bytes())
    assert r["ok"] is True and r["problems"] == []
    c, d = r["connections"], r["delivery"]
    assert (c["opened"], c["failed"], c["dropped"]) == (200, 0, 0)
    assert (d["missing"], d["gaps"], d["duplicates"], d["out_of_order"], d["beyond"]) == (0, 0, 0, 0, 0)
    assert (d["unexpected"], d["resets"], d["publish_errors"]) == (0, 0, 0)
    # 20 subscribers per channel, each must get exactly what was published on its channel.
    assert d["published"] > 0
    assert d["subscribers"] == d["complete_subscribers"] == 200
    assert d["delivered"] == d["expected"] == 20 * d["published"]
    latency = r["latency_ms"]
    assert latency["samples"] == d["delivered"]
    assert all(isinstance(latency[k], float) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
    assert latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert r["connections"]["connect_ms"]["samples"] == 200
    assert r["hub"]["cpu_us_per_delivery"] is not None and r["hub"]["rss_peak_bytes"] > 0
    assert "| deliveries / expected |" in md.read_text()
    # One point per second of the run, and the PNG drawn from them.
    assert len(r["timeline"]) >= 3 and any(p.get("p99_ms") for p in r["timeline"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flags_win_over_environment_and_lists_take_commas_and_repeats() -> None:
    env = {"LOADTEST_CONNECTIONS": "7", "LOADTEST_URL": "http://a:1,http://b:2", "LOADTEST_RATE": "5"}
    s, scenario = settings_from_args(["fanout", "--connections", "9", "--pid", "3,4", "--pid", "5"], env)
    assert (s.connections, s.rate_per_s, s.pids) == (9, 5.0, (3, 4, 5))
    assert s.urls == ("http://a:1", "http://b:2")
    assert scenario.name == "fanout"
    s, _ = settings_from_args([], {"LOADTEST_SCENARIO": "publish"})
    # The publish scenario's own defaults: a few publishers, unpaced.
    assert (s.scenario, s.connections, s.rate_per_s) == ("publish", 16, 0.0)


def test_source_addresses_take_ranges_and_lists() -> None:
    argv = ["idle", "--source-addresses", "127.0.0.2-127.0.0.4,10.0.0.1", "--source-addresses", "::1"]
    s, _ = settings_from_args(argv, {})
    assert s.source_addresses == ("127.0.0.2", "127.0.0.3", "127.0.0.4", "10.0.0.1", "::1")


@pytest.mark.e2e
def test_connections_come_from_each_source_address_in_turn(tmp_path: Path) -> None:
    # The hub counts streams per client address: two per address, four connections, all open only when they come
    # from two addresses (from one, two of them are refused with 429).
    node = HubProcess(*LOAD_FLAGS[:-2], "--max-streams-per-client", "2", "--log-level", "warning")
    node.start()
    try:
        for sources, opened in (("127.0.0.2-127.0.0.3", 4), ("127.0.0.2", 2)):
            out = tmp_path / "out.json"
            args = ["idle", "--url", node.url, "--connections", "4", "--channels", "2", "--duration", "0.5"]
            args += ["--workers", "1", "--source-addresses", sources, "--json", str(out)]
            proc = subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=ROOT, capture_output=True, timeout=60)
            r = orjson.loads(out.read_bytes())
            assert r["connections"]["opened"] == opened, proc.stderr.decode(errors="replace")[-2000:]
            assert r["connections"]["opened_per_s"] > 0
    finally:
        node.close()


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["nope"], {}),
        ([], {}),
        (["fanout", "--connections", "many"], {}),
        (["fanout"], {"LOADTEST_BATCH": "0"}),
        (["fanout", "--url", "ftp://x"], {}),
        (["fanout", "--target", "nope"], {}),
        (["fanout", "--redis-url", "http://x"], {}),
        (["idle", "--source-addresses", "127.0.0.9-127.0.0.2"], {}),
        (["idle", "--source-addresses", "localhost"], {}),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        settings_from_args(argv, env)


def test_bad_settings_exit_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fanout", "--channels", "0"]) == 2
    assert "--channels" in capsys.readouterr().err


def test_a_hard_file_limit_below_the_connections_says_how_to_raise_it() -> None:
    s = LoadSettings(scenario="idle", connections=50_000, workers=2)
    need = SCENARIOS["idle"]().fds_per_worker(s)
    assert need == 25_064
    problem = fd_limit_problem(need, 1024, 4096, s)
    assert problem is not None and f"ulimit -n {need}" in problem
    assert fd_limit_problem(need, 1024, need, s) is None
    assert fd_limit_problem(need, 1024, resource.RLIM_INFINITY, s) is None
