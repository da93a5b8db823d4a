"""What each kind of provider can be asked: a request it cannot serve is refused before anything is queued, with the
field named, rather than failing later as an error event.

The hub checks a job against the kind of the provider it names; the worker, which translates the request, relies on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .chat import ChatError, data_url_mime

__all__ = ["ANTHROPIC_THINKING_BUDGETS", "KINDS", "Support", "check_support"]

# The wire formats a provider entry can speak.
KINDS = ("openai", "openai-responses", "azure-openai", "anthropic", "gemini", "demo")

# Anthropic reads images of these types, and PDF documents.
_ANTHROPIC_IMAGES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# reasoning_effort -> Anthropic's thinking budget_tokens (1024 is the least the API takes). The answer's max_tokens
# counts the thinking too and must exceed it; the provider module reads the same table.
ANTHROPIC_THINKING_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}


@dataclass(frozen=True, slots=True)
class Support:
    """The parts of a request a capability check looks at."""

    messages: Sequence[dict[str, Any]]
    tools: Sequence[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] | None = None
    max_tokens: int | None = None


def _refuse(field: str, provider: str, why: str) -> ChatError:
    return ChatError("unsupported", f"{field}: provider {provider} {why}")


def _parts(messages: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            out.extend((f"messages[{i}].content[{j}]", part) for j, part in enumerate(content))
    return out


def _anthropic(name: str, req: Support) -> None:
    for path, part in _parts(req.messages):
        if part["type"] == "image_url":
            mime = data_url_mime(part["image_url"]["url"])
            if mime is not None and mime not in _ANTHROPIC_IMAGES:
                raise _refuse(f"{path}.image_url.url", name, f"reads JPEG, PNG, GIF and WebP images, not {mime}")
        elif part["type"] == "file" and data_url_mime(part["file"]["file_data"]) != "application/pdf":
            raise _refuse(f"{path}.file.file_data", name, "reads PDF files only")
    if req.response_format is not None and req.response_format["type"] == "json_object":
        raise _refuse("response_format", name, 'needs a schema: use {"type": "json_schema"}')
    if req.temperature is not None and req.temperature > 1:
        raise _refuse("params.temperature", name, "takes a temperature from 0 to 1")
    if req.reasoning_effort is not None:
        if req.tool_choice == "required" or isinstance(req.tool_choice, dict):
            raise _refuse("tool_choice", name, "cannot force a tool call while thinking (reasoning_effort)")
        for field, value in (("params.temperature", req.temperature), ("params.top_p", req.top_p)):
            if value is not None:
                raise _refuse(field, name, "takes no sampling parameters while thinking (reasoning_effort)")
        budget = ANTHROPIC_THINKING_BUDGETS[req.reasoning_effort]
        if req.max_tokens is not None and req.max_tokens <= budget:
            why = f"needs max_tokens above the thinking budget of reasoning_effort {req.reasoning_effort} ({budget})"
            raise _refuse("params.max_tokens", name, why)


def _gemini(name: str, req: Support) -> None:
    for path, part in _parts(req.messages):
        if part["type"] == "image_url" and data_url_mime(part["image_url"]["url"]) is None:
            raise _refuse(f"{path}.image_url.url", name, "takes images as data: URLs, not links")
    if req.parallel_tool_calls is False:
        raise _refuse("parallel_tool_calls", name, "cannot be kept to one tool call per answer")


def _responses(name: str, req: Support) -> None:
    if req.stop is not None:
        raise _refuse("params.stop", name, "(the Responses API) has no stop sequences")


def _demo(name: str, req: Support) -> None:
    if req.response_format is not None:
        raise _refuse("response_format", name, "answers only in text")


_CHECKS = {"anthropic": _anthropic, "gemini": _gemini, "openai-responses": _responses, "demo": _demo}


def check_support(kind: str, name: str, req: Support) -> None:
    """Raise ChatError("unsupported", ...) naming the first field provider `name` (of `kind`) cannot serve."""
    check = _CHECKS.get(kind)
    if check is not None:
        check(name, req)
