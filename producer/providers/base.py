"""The provider contract: one streaming call to an AI provider, normalized to text deltas and one finish.

A provider is one module with one class implementing `Provider`. Retrying is not the provider's business: it raises
`ProviderError` saying whether a retry could help and after how long; the worker decides (only before the first token).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

__all__ = [
    "Finish",
    "GenerationRequest",
    "Provider",
    "ProviderConfig",
    "ProviderError",
    "ReasoningDelta",
    "RefusalDelta",
    "StreamItem",
    "TextDelta",
]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate. `params` already validated; None means "the provider's default"."""

    model: str
    messages: Sequence[Mapping[str, str]]  # [{"role": "system" | "user" | "assistant", "content": "..."}]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The next piece of generated text (never empty)."""

    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of a successful stream, yielded exactly once, last.

    `finish_reason` is normalized: "stop", "length", "content_filter", "tool_calls", or the provider's own value
    lower-cased when it has no equivalent.
    """

    finish_reason: str
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """The next piece of the reasoning (thinking) text a provider shows (never empty): not part of the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """The next piece of a refusal the model gave instead of an answer (never empty)."""

    text: str


StreamItem = TextDelta | ReasoningDelta | RefusalDelta | Finish


class ProviderError(Exception):
    """A provider call failed.

    `code` is stable and safe to show (e.g. "rate_limited", "overloaded", "auth", "bad_request", "quota_exhausted",
    "server_error", "connection", "timeout", "stream_truncated", "bad_response"); `message` never contains secrets.
    `retryable` says a new attempt could succeed; `after_s` is the provider's own hint (Retry-After, RetryInfo).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retryable = retryable
        self.after_s = after_s


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """Where and how to reach one provider."""

    api_key: str | None = None
    base_url: str | None = None  # None: the provider's public default
    connect_timeout_s: float = 10.0
    # Longest silence allowed between two reads of the response (the first token included).
    read_timeout_s: float = 60.0
    extra_headers: Mapping[str, str] = field(default_factory=dict)


class Provider(Protocol):
    """One AI provider's streaming API."""

    name: str

    def stream(self, session: aiohttp.ClientSession, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        """Start the call and yield TextDelta items, then exactly one Finish.

        Raises ProviderError for every failure, before or during the stream, including a stream that ends without
        the provider's end marker ("stream_truncated") and an error reported inside a stream that began with HTTP
        200. Closing the generator (or cancelling the task iterating it) aborts the HTTP request.
        """
        ...
