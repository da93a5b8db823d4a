"""The provider contract: one streaming call to an AI provider, normalized to deltas (text, reasoning, refusal, tool
calls) and one finish.

A provider is one module with one class implementing `Provider`. Retrying is not the provider's business: it raises
`ProviderError` saying whether a retry could help and after how long; the worker decides (only before the first token).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    "ToolCallDelta",
    "ToolCallEnd",
]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate, in the job's own (OpenAI Chat Completions) vocabulary, already validated and checked against
    what the provider's kind can do (ssecore.chat, ssecore.capabilities). None means "the provider's default"."""

    model: str
    messages: Sequence[Mapping[str, Any]]  # roles system, developer, user, assistant, tool; content str or parts
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] | None = None
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: Mapping[str, Any] | None = None
    reasoning_effort: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The next piece of generated text (never empty)."""

    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of a successful stream, yielded exactly once, last.

    `finish_reason` is normalized: "stop", "length", "content_filter", "tool_calls", or the provider's own value
    lower-cased when it has no equivalent. `output_tokens` includes `reasoning_tokens`; `input_tokens` includes
    `cached_input_tokens`. `provider_state`: what the provider needs to continue from this answer (thinking
    signatures, say), private to the provider module; it travels in `done.message.provider_state` under its kind.
    """

    finish_reason: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_input_tokens: int | None = None
    provider_state: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """The next piece of the reasoning (thinking) text a provider shows (never empty): not part of the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """The next piece of a refusal the model gave instead of an answer (never empty)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a tool call's arguments (a piece of a JSON string, possibly empty).

    `index` is the call's position among this answer's calls, 0, 1, ... in order of appearance, whatever the provider
    numbers its blocks. `id` and `name` come with the call's first fragment (an `id` the provider does not give is
    made up by the worker). A provider that sends a call whole sends one delta and a ToolCallEnd.
    """

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """The call at `index` is complete. Calls a provider never ends explicitly are complete at the Finish."""

    index: int


StreamItem = TextDelta | ReasoningDelta | RefusalDelta | ToolCallDelta | ToolCallEnd | Finish


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
        # The provider had accepted the request (answered 2xx) when this happened: it may be generating, and billing,
        # so the worker does not try again, whatever `retryable` says of the error's nature.
        self.accepted = False


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """Where and how to reach one provider."""

    api_key: str | None = None
    base_url: str | None = None  # None: the provider's public default
    connect_timeout_s: float = 10.0
    # Longest silence allowed between two reads of the response, once its first byte came.
    read_timeout_s: float = 60.0
    # Longest wait for the answer's first output (its head, then its first token, reasoning or call): a reasoning
    # model may think for minutes first. Bytes that say nothing (pings, a role chunk) do not end the wait.
    first_byte_timeout_s: float = 300.0
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)  # added to the URL (Azure's api-version)
    # OpenAI wire only: ask for the usage chunk (`stream_options`; some servers refuse it), and the name of the
    # output cap (older servers and Mistral know only `max_tokens`).
    stream_usage: bool = True
    max_tokens_param: str = "max_completion_tokens"
    # The output cap of a request that gives none, for a provider that requires one (Anthropic): None for its default.
    default_max_tokens: int | None = None


class Provider(Protocol):
    """One AI provider's streaming API."""

    name: str  # what jobs call it
    kind: str  # the API it speaks (ssecore.capabilities.KINDS)

    def stream(self, session: aiohttp.ClientSession, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        """Start the call and yield the answer's items (TextDelta, ReasoningDelta, ...), then exactly one Finish.

        Raises ProviderError for every failure, before or during the stream, including a stream that ends without
        the provider's end marker ("stream_truncated") and an error reported inside a stream that began with HTTP
        200. Closing the generator (or cancelling the task iterating it) aborts the HTTP request.
        """
        ...
