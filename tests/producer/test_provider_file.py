"""`--providers-file`: what a file may say, each mistake as one start-up line (in process and from `python -m hub` and
`python -m producer`), a hub that checks jobs against it, and the entries' options as the provider server sees them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from hub.settings import HubSettings
from producer.settings import ProducerSettings, ProviderKeys, providers_for
from producer.worker import Worker
from ssecore.backend import Entry
from ssecore.backend_memory import MemoryBackend
from ssecore.jobs import Job, new_generation_id
from ssecore.provider_file import ProviderEntry, ProviderFileError, catalog, load_provider_file
from ssecore.queue_memory import MemoryJobQueue
from tests.conftest import ClientFactory
from tests.producer.fake_providers import DEFAULT_TOKENS, Behaviour, FakeProviders
from tests.support import ROOT, collect

AZURE_KEY = "azure-key-0123456789abcdef"
MISTRAL_KEY = "mistral-key-0123456789abcdef"

# Every field, in both forms a user may write them.
FULL_JSON = {
    "azure": {
        "kind": "azure-openai",
        "base_url": "https://my-resource.openai.azure.com",
        "api_key_env": "AZURE_OPENAI_API_KEY",
        "query": {"api-version": "2024-10-21"},
        "models": ["gpt-4o-prod", "gpt-4o-mini-prod"],
        "timeout_s": 120,
    },
    "mistral": {
        "kind": "openai",
        "base_url": "https://api.mistral.ai/v1",
        "api_key_env": "MISTRAL_API_KEY",
        "headers": {"X-Team": "search"},
        "stream_usage": False,
        "max_tokens_param": "max_tokens",
        "models": ["mistral-large-latest"],
        "timeout_s": 30.5,
    },
    "claude-eu": {"kind": "anthropic", "base_url": "https://eu.example.com", "api_key_env": "ANTHROPIC_EU_KEY"},
    "gemini-2": {"kind": "gemini", "api_key_env": "GEMINI_SECOND_KEY"},
    "responses.proxy": {"kind": "openai-responses", "base_url": "http://10.0.0.5:8000/v1"},
}
FULL_YAML = """\
# The same entries, as YAML.
azure:
  kind: azure-openai
  base_url: https://my-resource.openai.azure.com
  api_key_env: AZURE_OPENAI_API_KEY
  query: {api-version: "2024-10-21"}
  models: [gpt-4o-prod, gpt-4o-mini-prod]
  timeout_s: 120
mistral:
  kind: openai
  base_url: https://api.mistral.ai/v1
  api_key_env: MISTRAL_API_KEY
  headers:
    X-Team: search
  stream_usage: false
  max_tokens_param: max_tokens
  models:
    - mistral-large-latest
  timeout_s: 30.5
claude-eu: {kind: anthropic, base_url: "https://eu.example.com", api_key_env: ANTHROPIC_EU_KEY}
gemini-2: {kind: gemini, api_key_env: GEMINI_SECOND_KEY}
responses.proxy: {kind: openai-responses, base_url: "http://10.0.0.5:8000/v1"}
"""
EXPECTED = {
    "azure": ProviderEntry(
        name="azure",
        kind="azure-openai",
        base_url="https://my-resource.openai.azure.com",
        api_key_env="AZURE_OPENAI_API_KEY",
        query={"api-version": "2024-10-21"},
        models=("gpt-4o-prod", "gpt-4o-mini-prod"),
        timeout_s=120.0,
    ),
    "mistral": ProviderEntry(
        name="mistral",
        kind="openai",
        base_url="https://api.mistral.ai/v1",
        api_key_env="MISTRAL_API_KEY",
        headers={"X-Team": "search"},
        stream_usage=False,
        max_tokens_param="max_tokens",
        models=("mistral-large-latest",),
        timeout_s=30.5,
    ),
    "claude-eu": ProviderEntry(
        name="claude-eu", kind="anthropic", base_url="https://eu.example.com", api_key_env="ANTHROPIC_EU_KEY"
    ),
    "gemini-2": ProviderEntry(name="gemini-2", kind="gemini", api_key_env="GEMINI_SECOND_KEY"),
    "responses.proxy": ProviderEntry(
        name="responses.proxy", kind="openai-responses", base_url="http://10.0.0.5:8000/v1"
    ),
}


def _write(directory: Path, name: str, content: object) -> str:
    path = directory / name
    path.write_text(content if isinstance(content, str) else orjson.dumps(content).decode())
    return str(path)


@pytest.mark.parametrize(("name", "content"), [("providers.json", FULL_JSON), ("providers.yaml", FULL_YAML)])
def test_a_file_with_every_field_loads_as_json_and_as_yaml(tmp_path: Path, name: str, content: object) -> None:
    entries = load_provider_file(_write(tmp_path, name, content))
    assert entries == EXPECTED
    # Options left out take the defaults of the wire: usage asked for, the current name of the output cap.
    assert (entries["azure"].stream_usage, entries["azure"].max_tokens_param) == (True, "max_completion_tokens")
    # What a hub node takes from it: every name a job may give, its kind, and the models of the entries that list any.
    hub = catalog(entries, demo=False)
    assert hub.kinds == {
        "openai": "openai",
        "openai-responses": "openai-responses",
        "anthropic": "anthropic",
        "gemini": "gemini",
        **{n: e.kind for n, e in EXPECTED.items()},
    }
    assert hub.models == {"azure": ("gpt-4o-prod", "gpt-4o-mini-prod"), "mistral": ("mistral-large-latest",)}
    assert "demo" in catalog(entries, demo=True).kinds


def test_a_yml_name_is_read_as_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.yml", "local: {kind: openai, base_url: 'http://127.0.0.1:8000/v1'}\n")
    assert load_provider_file(path)["local"].base_url == "http://127.0.0.1:8000/v1"


OK = {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1"}

# (file name, content, what its one line must say). The entry is named where there is one.
MISTAKES: list[tuple[str, object, list[str]]] = [
    ("bad-kind.json", {"x": {"kind": "cohere"}}, ["entry 'x'", "kind must be one of openai, openai-responses"]),
    ("no-kind.json", {"x": {"base_url": "http://h/v1"}}, ["entry 'x'", "kind must be one of"]),
    ("demo-kind.json", {"x": {"kind": "demo"}}, ["entry 'x'", "kind must be one of"]),
    ("builtin.json", {"openai": OK}, ["'openai' is a built-in provider"]),
    ("builtin-demo.json", {"demo": OK}, ["'demo' is a built-in provider"]),
    ("builtin-responses.json", {"openai-responses": OK}, ["'openai-responses' is a built-in provider"]),
    ("bad-name.json", {"my endpoint": OK}, ["names are 1-64 characters"]),
    ("long-name.json", {"x" * 65: OK}, ["names are 1-64 characters"]),
    ("slash-name.json", {"a/b": OK}, ["names are 1-64 characters"]),
    ("azure.json", {"az": {"kind": "azure-openai"}}, ["entry 'az'", "azure-openai needs base_url"]),
    ("base-url.json", {"x": {"kind": "openai", "base_url": "ftp://h"}}, ["entry 'x'", "base_url must be an http(s)"]),
    (
        "usage.json",
        {"c": {"kind": "anthropic", "stream_usage": False}},
        ["entry 'c'", "stream_usage and max_tokens_param are for the openai and azure-openai kinds"],
    ),
    (
        "param-kind.json",
        {"g": {"kind": "gemini", "max_tokens_param": "max_tokens"}},
        ["entry 'g'", "stream_usage and max_tokens_param are for"],
    ),
    ("usage-type.json", {"x": {**OK, "stream_usage": "no"}}, ["entry 'x'", "stream_usage must be true or false"]),
    (
        "param.json",
        {"x": {**OK, "max_tokens_param": "maxTokens"}},
        ["entry 'x'", "max_tokens_param must be max_completion_tokens or max_tokens"],
    ),
    ("models.json", {"x": {**OK, "models": ["a", 5]}}, ["entry 'x'", "models must be a list of model names"]),
    ("models-str.json", {"x": {**OK, "models": "gpt-4o"}}, ["entry 'x'", "models must be a list"]),
    ("models-empty.json", {"x": {**OK, "models": [""]}}, ["entry 'x'", "models must be a list"]),
    ("timeout.json", {"x": {**OK, "timeout_s": 0}}, ["entry 'x'", "timeout_s must be a positive number"]),
    ("timeout-neg.json", {"x": {**OK, "timeout_s": -5}}, ["entry 'x'", "timeout_s must be a positive number"]),
    ("timeout-str.json", {"x": {**OK, "timeout_s": "30"}}, ["entry 'x'", "timeout_s must be a positive number"]),
    ("timeout-bool.json", {"x": {**OK, "timeout_s": True}}, ["entry 'x'", "timeout_s must be a positive number"]),
    ("unknown.json", {"x": {**OK, "api_key": "sk-123", "model": "m"}}, ["entry 'x'", "unknown fields api_key, model"]),
    ("key-env.json", {"x": {**OK, "api_key_env": "sk-live-123"}}, ["entry 'x'", "api_key_env must name an env"]),
    ("headers.json", {"x": {**OK, "headers": {"X-N": 1}}}, ["entry 'x'", "headers must be an object of strings"]),
    ("query.json", {"x": {**OK, "query": ["api-version"]}}, ["entry 'x'", "query must be an object of strings"]),
    ("entry.json", {"x": ["openai"]}, ["entry 'x' must be an object"]),
    ("not.json", '{"x": {"kind": "openai",}}', ["not valid JSON"]),
    ("not.yaml", "x: {kind: openai\n  base_url: [\n", ["not valid YAML"]),
    ("list.json", [OK], ["must map provider names to entries"]),
    ("empty.json", {}, ["must map provider names to entries"]),
    ("empty.yaml", "", ["must map provider names to entries"]),
    ("scalar.yaml", "openai\n", ["must map provider names to entries"]),
]


@pytest.mark.parametrize(("name", "content", "says"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_one_line_naming_the_file_the_entry_and_the_field(
    tmp_path: Path, name: str, content: object, says: list[str]
) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(ProviderFileError) as caught:
        load_provider_file(path)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"providers file {path}"), line
    for words in says:
        assert words in line, line


def test_a_file_that_cannot_be_read_says_why(tmp_path: Path) -> None:
    for path, why in ((tmp_path / "missing.json", "No such file"), (tmp_path, "Is a directory")):
        with pytest.raises(ProviderFileError) as caught:
            load_provider_file(str(path))
        line = str(caught.value)
        assert "\n" not in line and line.startswith(f"providers file {path}: ") and why in line, line


@pytest.mark.parametrize(
    ("settings", "env", "others"), [(HubSettings, "HUB_", {"anonymous": True}), (ProducerSettings, "PRODUCER_", {})]
)
def test_the_settings_refuse_a_bad_file_naming_the_setting(
    tmp_path: Path, settings: Any, env: str, others: dict[str, Any]
) -> None:
    path = _write(tmp_path, "bad.json", {"x": {"kind": "cohere"}})
    with pytest.raises(ValueError) as caught:
        settings(providers_file=path, **others)
    said = f"invalid setting --providers-file ({env}PROVIDERS_FILE): providers file {path}: entry 'x': kind must be"
    assert str(caught.value).startswith(said)
    good = _write(tmp_path, "good.json", {"x": OK})
    assert settings(providers_file=good, **others).providers_file == good


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUB_", "PRODUCER_"))}
    return {**env, **extra}


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["hub", "--anonymous", "--providers-file", "{path}"], {}),
        (["hub", "--anonymous"], {"HUB_PROVIDERS_FILE": "{path}"}),
        (["producer", "--redis-url", "redis://127.0.0.1:1/0", "--providers-file", "{path}"], {}),
        (["producer", "--redis-url", "redis://127.0.0.1:1/0"], {"PRODUCER_PROVIDERS_FILE": "{path}"}),
    ],
)
def test_a_process_given_a_bad_file_exits_2_with_that_one_line(
    tmp_path: Path, argv: list[str], env: dict[str, str]
) -> None:
    path = _write(tmp_path, "bad.json", {"mistral": {**OK, "max_tokens_param": "maxTokens"}})
    proc = subprocess.run(
        [sys.executable, "-m", *(a.format(path=path) for a in argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(**{k: v.format(path=path) for k, v in env.items()}),
    )
    setting = f"--providers-file ({argv[0].upper()}_PROVIDERS_FILE)"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"python -m {argv[0]}: invalid setting {setting}: providers file {path}: entry 'mistral': max_tokens_param "
        "must be max_completion_tokens or max_tokens"
    ]


# -- A hub with a file ------------------------------------------------------------------------------------------------


async def test_a_hub_takes_jobs_for_the_files_providers_and_refuses_other_names_and_models(
    tmp_path: Path, make_client: ClientFactory, fake: FakeProviders
) -> None:
    # No key: the fake server asks for none. The hub's embedded worker takes the file from the hub.
    entry = {"kind": "openai", "base_url": fake.base_url("openai"), "models": ["normal", "length"]}
    path = _write(tmp_path, "providers.yaml", orjson.dumps({"local-llm": entry}).decode())  # JSON is YAML too
    client = await make_client(providers_file=path, demo=False)
    job = {"provider": "local-llm", "model": "normal", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/generations", json=job, headers={"Accept": "text/event-stream"})
    assert resp.status == 200
    events = await collect(resp)
    assert [e.event for e in events] == ["start", *["token"] * len(DEFAULT_TOKENS), "done"]
    [served] = fake.requests_for("normal")
    assert served.path == "/v1/chat/completions"

    resp = await client.post("/v1/generations", json={**job, "model": "gpt-4o"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "invalid_model" and "provider local-llm serves the models normal, length" in body["message"]

    resp = await client.post("/v1/generations", json={**job, "provider": "local-llm-2"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "unknown_provider" and "local-llm" in body["message"] and "demo" not in body["message"]
    assert len(fake.requests) == 1  # neither reached the provider


async def test_a_hub_without_the_file_refuses_its_names(make_client: ClientFactory) -> None:
    client = await make_client(embedded_worker="off")
    job = {"provider": "local-llm", "model": "normal", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/generations", json=job)
    assert resp.status == 400 and (await resp.json())["error"] == "unknown_provider"


async def test_an_entry_without_models_takes_any_model(tmp_path: Path, make_client: ClientFactory) -> None:
    path = _write(tmp_path, "p.json", {"vllm": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1"}})
    client = await make_client(providers_file=path, embedded_worker="off")
    job = {"provider": "vllm", "model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/generations", json=job)
    assert resp.status == 202, await resp.text()


# -- The entries' options on the wire, through a worker built as `python -m producer` builds it -----------------------


@contextlib.asynccontextmanager
async def _worker_from_file(
    tmp_path: Path, entries: Mapping[str, Any], environ: Mapping[str, str], **settings_: Any
) -> AsyncIterator[tuple[MemoryBackend, MemoryJobQueue]]:
    path = _write(tmp_path, "p.json", entries)
    settings = ProducerSettings(metrics_port=0, poll_s=0.05, providers_file=path, **settings_)
    backend, queue = MemoryBackend(history=1000, ttl_s=3600), MemoryJobQueue()
    providers = providers_for(settings, ProviderKeys.from_env(environ))
    worker = Worker(settings, backend=backend, queue=queue, providers=providers)
    task = asyncio.create_task(worker.run_async())
    try:
        yield backend, queue
    finally:
        worker.stop()
        await task


async def _run(backend: MemoryBackend, queue: MemoryJobQueue, provider: str, model: str) -> list[Entry]:
    gid = new_generation_id()
    messages = [{"role": "user", "content": "hi"}]
    job = Job(id=gid, provider=provider, model=model, messages=messages, channel=f"gen:{gid}", max_tokens=50)
    await queue.submit(job)
    for _ in range(1000):
        info = await backend.info(job.channel)
        if info is not None and info.closed:
            return (await backend.range(job.channel, "0", limit=1000)).entries
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job.channel} not finished")


@pytest.fixture
async def wire_rig(tmp_path: Path, fake: FakeProviders) -> AsyncIterator[tuple[MemoryBackend, MemoryJobQueue]]:
    entries = {
        "azure": {
            "kind": "azure-openai",
            "base_url": fake.base_url("azure-openai"),
            "api_key_env": "AZURE_OPENAI_API_KEY",
            "query": {"api-version": "2024-10-21"},
        },
        "mistral": {
            "kind": "openai",
            "base_url": fake.base_url("openai"),
            "api_key_env": "MISTRAL_API_KEY",
            "headers": {"X-Team": "search"},
            "stream_usage": False,
            "max_tokens_param": "max_tokens",
        },
        "vllm": {"kind": "openai", "base_url": fake.base_url("openai")},
    }
    environ = {"AZURE_OPENAI_API_KEY": AZURE_KEY, "MISTRAL_API_KEY": MISTRAL_KEY}
    async with _worker_from_file(tmp_path, entries, environ) as rig:
        yield rig


def _done(entries: list[Entry]) -> dict[str, Any]:
    assert [e.event for e in entries] == ["start", *["token"] * len(DEFAULT_TOKENS), "done"], entries
    done: dict[str, Any] = orjson.loads(entries[-1].data)
    return done


async def test_an_azure_entry_calls_the_deployment_with_the_api_version_and_an_api_key_header(
    fake: FakeProviders, wire_rig: tuple[MemoryBackend, MemoryJobQueue]
) -> None:
    done = _done(await _run(*wire_rig, "azure", "gpt-4o-prod"))
    assert done["finish_reason"] == "stop" and done["usage"]["output_tokens"] == len(DEFAULT_TOKENS)
    [request] = fake.requests_for("gpt-4o-prod")
    assert (request.provider, request.path) == ("azure-openai", "/openai/deployments/gpt-4o-prod/chat/completions")
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == AZURE_KEY and "authorization" not in request.headers
    assert request.body["stream_options"] == {"include_usage": True}  # the default: Azure sends usage when asked


async def test_an_entry_with_stream_usage_off_and_max_tokens_sends_neither_stream_options_nor_the_new_name(
    fake: FakeProviders, wire_rig: tuple[MemoryBackend, MemoryJobQueue]
) -> None:
    _done(await _run(*wire_rig, "mistral", "mistral-large-latest"))
    [request] = fake.requests_for("mistral-large-latest")
    assert request.path == "/v1/chat/completions" and request.query == {}
    assert "stream_options" not in request.body and request.body["stream"] is True
    assert request.body["max_tokens"] == 50 and "max_completion_tokens" not in request.body
    assert request.headers["authorization"] == f"Bearer {MISTRAL_KEY}" and "api-key" not in request.headers
    assert request.headers["x-team"] == "search"


async def test_an_entry_with_the_defaults_asks_for_usage_and_sends_max_completion_tokens_without_a_key(
    fake: FakeProviders, wire_rig: tuple[MemoryBackend, MemoryJobQueue]
) -> None:
    _done(await _run(*wire_rig, "vllm", "Qwen/Qwen3-8B"))
    [request] = fake.requests_for("Qwen/Qwen3-8B")
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["max_completion_tokens"] == 50 and "max_tokens" not in request.body
    assert "authorization" not in request.headers and "x-team" not in request.headers


async def test_an_entrys_timeout_s_bounds_the_silence_between_chunks_else_the_workers_for_its_kind_does(
    tmp_path: Path, fake: FakeProviders
) -> None:
    fake.behaviours["pause"] = Behaviour(tokens=("a ", "b"), pace_s=0.6)  # a silence after the first token
    entries = {
        "quick": {"kind": "openai", "base_url": fake.base_url("openai")},
        "patient": {"kind": "openai", "base_url": fake.base_url("openai"), "timeout_s": 3},
    }
    async with _worker_from_file(tmp_path, entries, {}, openai_timeout_s=0.2) as rig:
        patient = await _run(*rig, "patient", "pause")
        assert [e.event for e in patient] == ["start", "token", "token", "done"]
        entries_ = await _run(*rig, "quick", "pause")
    assert [e.event for e in entries_] == ["start", "token", "error"]
    assert orjson.loads(entries_[-1].data)["code"] == "timeout"
    assert len(fake.requests_for("pause")) == 2  # one each: the one that timed out was accepted, so not sent again
