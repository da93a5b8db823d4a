"""The providers a worker can call, built from its settings and the providers' environment variables."""

from __future__ import annotations

from ssecore.jobs import PROVIDER_NAMES

from .base import Provider, ProviderConfig
from .demo import DemoProvider

__all__ = ["PROVIDER_NAMES", "build_providers"]


def build_providers(
    *,
    demo: bool = True,
    demo_tokens_per_s: float,
    connect_timeout_s: float,
    openai: tuple[str | None, str | None, float] = (None, None, 60.0),
    anthropic: tuple[str | None, str | None, float] = (None, None, 60.0),
    gemini: tuple[str | None, str | None, float] = (None, None, 60.0),
) -> dict[str, Provider]:
    """One instance per provider (the demo one only with `demo`). Each tuple is (api key, base URL or None for the
    public one, read timeout). `openai-responses` is OpenAI's other API: it takes `openai`'s key, URL and timeout."""
    from .anthropic import AnthropicProvider
    from .gemini import GeminiProvider
    from .openai import OpenAIProvider
    from .openai_responses import OpenAIResponsesProvider

    def config(spec: tuple[str | None, str | None, float]) -> ProviderConfig:
        key, base_url, read_timeout_s = spec
        return ProviderConfig(
            api_key=key, base_url=base_url, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s
        )

    providers: dict[str, Provider] = {
        "openai": OpenAIProvider(config(openai)),
        "openai-responses": OpenAIResponsesProvider(config(openai)),
        "anthropic": AnthropicProvider(config(anthropic)),
        "gemini": GeminiProvider(config(gemini)),
    }
    if demo:
        providers["demo"] = DemoProvider(demo_tokens_per_s)
    return providers
