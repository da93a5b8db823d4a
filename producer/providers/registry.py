"""The providers a worker can call, built from its settings, the providers' environment variables and its providers
file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from ssecore.jobs import PROVIDER_NAMES
from ssecore.provider_file import ProviderEntry

from .base import Provider, ProviderConfig
from .demo import DemoProvider

__all__ = ["PROVIDER_NAMES", "build_providers"]


def _named(entry: ProviderEntry, environ: Mapping[str, str], base: ProviderConfig) -> Provider:
    """The provider of a providers-file entry; `base` holds the worker's settings for every provider."""
    from .anthropic import AnthropicProvider
    from .gemini import GeminiProvider
    from .openai import AzureOpenAIProvider, OpenAIProvider
    from .openai_responses import OpenAIResponsesProvider

    kinds = {
        "openai": OpenAIProvider,
        "openai-responses": OpenAIResponsesProvider,
        "azure-openai": AzureOpenAIProvider,
        "anthropic": AnthropicProvider,
        "gemini": GeminiProvider,
    }
    config = replace(
        base,
        api_key=environ.get(entry.api_key_env) or None if entry.api_key_env else None,
        base_url=entry.base_url,
        read_timeout_s=entry.timeout_s or base.read_timeout_s,
        extra_headers=dict(entry.headers),
        query=dict(entry.query),
        stream_usage=entry.stream_usage,
        max_tokens_param=entry.max_tokens_param,
    )
    return kinds[entry.kind](config, name=entry.name)


def build_providers(
    *,
    demo: bool = True,
    demo_tokens_per_s: float,
    connect_timeout_s: float,
    first_byte_timeout_s: float = 300.0,
    openai: tuple[str | None, str | None, float] = (None, None, 60.0),
    anthropic: tuple[str | None, str | None, float] = (None, None, 60.0),
    gemini: tuple[str | None, str | None, float] = (None, None, 60.0),
    anthropic_max_tokens: int | None = None,
    entries: Mapping[str, ProviderEntry] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Provider]:
    """One instance per provider (the demo one only with `demo`). Each tuple is (api key, base URL or None for the
    public one, read timeout); `openai-responses` is OpenAI's other API, with `openai`'s key, URL and timeout.
    `entries`: a providers file's, their keys read from `environ`."""
    from .anthropic import AnthropicProvider
    from .gemini import GeminiProvider
    from .openai import OpenAIProvider
    from .openai_responses import OpenAIResponsesProvider

    def config(spec: tuple[str | None, str | None, float]) -> ProviderConfig:
        key, base_url, read_timeout_s = spec
        return ProviderConfig(
            api_key=key,
            base_url=base_url,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            first_byte_timeout_s=first_byte_timeout_s,
        )

    providers: dict[str, Provider] = {
        "openai": OpenAIProvider(config(openai)),
        "openai-responses": OpenAIResponsesProvider(config(openai)),
        "anthropic": AnthropicProvider(replace(config(anthropic), default_max_tokens=anthropic_max_tokens)),
        "gemini": GeminiProvider(config(gemini)),
    }
    if demo:
        providers["demo"] = DemoProvider(demo_tokens_per_s)
    # An entry without timeout_s takes the worker's idle timeout of the built-in provider on the same wire.
    read_timeouts = {
        "openai": openai[2],
        "openai-responses": openai[2],
        "azure-openai": openai[2],
        "anthropic": anthropic[2],
        "gemini": gemini[2],
    }
    for name, entry in (entries or {}).items():
        config_named = ProviderConfig(
            connect_timeout_s=connect_timeout_s,
            first_byte_timeout_s=first_byte_timeout_s,
            default_max_tokens=anthropic_max_tokens,
            read_timeout_s=read_timeouts[entry.kind],
        )
        providers[name] = _named(entry, environ or {}, config_named)
    return providers
