"""Named provider endpoints from a file (`--providers-file`, JSON or YAML): any OpenAI-compatible server, Azure
OpenAI, a second Anthropic account. Read by hub nodes (names, kinds and models, to check jobs) and workers (the rest).

    {"mistral": {"kind": "openai", "base_url": "https://api.mistral.ai/v1", "api_key_env": "MISTRAL_API_KEY",
                 "stream_usage": false, "max_tokens_param": "max_tokens", "models": ["mistral-large-latest"]},
     "azure": {"kind": "azure-openai", "base_url": "https://my-resource.openai.azure.com",
               "api_key_env": "AZURE_OPENAI_API_KEY", "query": {"api-version": "2024-10-21"}}}

Every mistake is one line naming the file, the entry and the field, at start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import yaml

from .capabilities import KINDS

__all__ = ["BUILTIN_PROVIDERS", "Catalog", "ProviderEntry", "ProviderFileError", "catalog", "load_provider_file"]

# The providers every worker has, configured from their usual environment variables; file entries add to them.
BUILTIN_PROVIDERS: Mapping[str, str] = MappingProxyType(
    {"openai": "openai", "openai-responses": "openai-responses", "anthropic": "anthropic", "gemini": "gemini"}
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FIELDS = frozenset(
    {"kind", "base_url", "api_key_env", "headers", "query", "stream_usage", "max_tokens_param", "models", "timeout_s"}
)
_OPENAI_WIRE = frozenset({"openai", "azure-openai"})
_MAX_TOKENS_PARAMS = ("max_completion_tokens", "max_tokens")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ProviderFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderEntry:
    """One named endpoint. `models`: the only models jobs may ask of it (empty: any)."""

    name: str
    kind: str
    base_url: str | None = None
    api_key_env: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    stream_usage: bool = True  # OpenAI wire: send stream_options (Mistral and some gateways refuse it)
    max_tokens_param: str = "max_completion_tokens"  # OpenAI wire: the field name of the output cap
    models: tuple[str, ...] = ()
    timeout_s: float | None = None  # longest silence between chunks (default: the worker's for the kind)


def _str_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ProviderFileError(f"{where} must be an object of strings")
    return dict(value)


def _openai_options(raw: dict[str, Any], kind: str, where: str) -> tuple[bool, str]:
    if kind not in _OPENAI_WIRE and ("stream_usage" in raw or "max_tokens_param" in raw):
        raise ProviderFileError(f"{where}: stream_usage and max_tokens_param are for the openai and azure-openai kinds")
    stream_usage = raw.get("stream_usage", True)
    if not isinstance(stream_usage, bool):
        raise ProviderFileError(f"{where}: stream_usage must be true or false")
    param = raw.get("max_tokens_param", "max_completion_tokens")
    if param not in _MAX_TOKENS_PARAMS:
        raise ProviderFileError(f"{where}: max_tokens_param must be {' or '.join(_MAX_TOKENS_PARAMS)}")
    return stream_usage, str(param)


def _entry(name: Any, raw: Any, where: str) -> ProviderEntry:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProviderFileError(f"{where}: names are 1-64 characters of A-Z a-z 0-9 _ . -")
    if name in BUILTIN_PROVIDERS or name == "demo":
        raise ProviderFileError(f"{where}: {name!r} is a built-in provider; give the entry a name of its own")
    where = f"{where} {name!r}"
    if not isinstance(raw, dict):
        raise ProviderFileError(f"{where} must be an object")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ProviderFileError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
    kind = raw.get("kind")
    if kind not in KINDS or kind == "demo":
        raise ProviderFileError(f"{where}: kind must be one of {', '.join(k for k in KINDS if k != 'demo')}")
    base_url = raw.get("base_url")
    if base_url is not None and (not isinstance(base_url, str) or not base_url.startswith(("https://", "http://"))):
        raise ProviderFileError(f"{where}: base_url must be an http(s) URL")
    if kind == "azure-openai" and base_url is None:
        raise ProviderFileError(f"{where}: azure-openai needs base_url, the resource root")
    key_env = raw.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not _ENV_NAME.match(key_env)):
        raise ProviderFileError(f"{where}: api_key_env must name an environment variable")
    stream_usage, param = _openai_options(raw, str(kind), where)
    models = raw.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and 0 < len(m) <= 200 for m in models):
        raise ProviderFileError(f"{where}: models must be a list of model names")
    timeout_s = raw.get("timeout_s")
    if timeout_s is not None and (
        isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0
    ):
        raise ProviderFileError(f"{where}: timeout_s must be a positive number of seconds")
    return ProviderEntry(
        name=name,
        kind=str(kind),
        base_url=base_url,
        api_key_env=key_env,
        headers=_str_map(raw.get("headers", {}), f"{where}: headers"),
        query=_str_map(raw.get("query", {}), f"{where}: query"),
        stream_usage=stream_usage,
        max_tokens_param=str(param),
        models=tuple(models),
        timeout_s=float(timeout_s) if timeout_s is not None else None,
    )


def load_provider_file(path: str) -> dict[str, ProviderEntry]:
    """The entries of a providers file (JSON, or YAML by its .yaml/.yml name), or ProviderFileError naming what is
    wrong."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ProviderFileError(f"providers file {path}: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else orjson.loads(text)
    except (yaml.YAMLError, orjson.JSONDecodeError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProviderFileError(
            f"providers file {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: {first_line}"
        ) from None
    if not isinstance(raw, dict) or not raw:
        raise ProviderFileError(f"providers file {path}: must map provider names to entries")
    return {name: _entry(name, entry, f"providers file {path}: entry") for name, entry in raw.items()}


@dataclass(frozen=True, slots=True)
class Catalog:
    """What a hub node knows of the providers: each name a job may give, its kind, and the models it allows (a name
    without an entry in `models` allows any)."""

    kinds: Mapping[str, str]
    models: Mapping[str, tuple[str, ...]]


def catalog(entries: Mapping[str, ProviderEntry], *, demo: bool) -> Catalog:
    """The built-ins, the demo provider if on, and the file's entries."""
    kinds = dict(BUILTIN_PROVIDERS)
    if demo:
        kinds["demo"] = "demo"
    kinds.update({name: e.kind for name, e in entries.items()})
    return Catalog(kinds, {name: e.models for name, e in entries.items() if e.models})
