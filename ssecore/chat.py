"""The chat vocabulary of a generation request, in OpenAI Chat Completions names: messages with parts, tool calls,
tools, tool_choice, response_format and reasoning_effort.

Validation only: what is accepted is kept in the caller's own shape (so `done.message` can be sent back verbatim),
and each provider module translates it. Every refusal names the field it is about, as a JSON path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeGuard

__all__ = [
    "EFFORTS",
    "ROLES",
    "ChatError",
    "assistant_state",
    "check_depth",
    "content_text",
    "data_url_mime",
    "parse_messages",
    "parse_parallel_tool_calls",
    "parse_reasoning_effort",
    "parse_response_format",
    "parse_tool_choice",
    "parse_tools",
    "tool_names",
]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
EFFORTS = ("low", "medium", "high")
MAX_MESSAGES = 1000
MAX_PARTS = 100  # content parts of one message
MAX_TOOLS = 128  # as OpenAI allows
MAX_TOOL_CALLS = 128  # calls in one assistant message
MAX_DEPTH = 64  # levels of nesting in a request (a JSON Schema rarely needs a dozen)
_MAX_ID = 256
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# data:<mime>;base64,<payload>: the only inline form every provider takes.
_DATA_URL = re.compile(r"^data:([a-z0-9.+-]+/[a-z0-9.+-]+);base64,", re.IGNORECASE)
_DETAILS = frozenset({"auto", "low", "high"})


class ChatError(ValueError):
    """A request field is invalid. `code` is the API error code; the message names the field."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _fail(path: str, why: str, code: str = "invalid_messages") -> ChatError:
    return ChatError(code, f"{path} {why}")


def _nonempty_str(value: Any, path: str, *, limit: int | None = None, code: str = "invalid_messages") -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, "must be a non-empty string", code)
    if limit is not None and len(value) > limit:
        raise _fail(path, f"must be at most {limit} characters", code)
    return value


def _keys(obj: Any, path: str, allowed: frozenset[str], required: tuple[str, ...] = (), code: str = "") -> None:
    code = code or "invalid_messages"
    if not isinstance(obj, dict):
        raise _fail(path, "must be an object", code)
    unknown = set(obj) - allowed
    if unknown:
        raise _fail(path, f"has unknown fields: {', '.join(sorted(unknown))[:200]}", code)
    for name in required:
        if name not in obj:
            raise _fail(f"{path}.{name}", "is required", code)


def _one_of(value: Any, options: frozenset[str]) -> TypeGuard[str]:
    # Membership of a set hashes the value: a JSON object or array is unhashable, and is no option anyway.
    return isinstance(value, str) and value in options


def data_url_mime(url: str) -> str | None:
    """The media type of a `data:<mime>;base64,` URL, lower-cased; None for any other URL."""
    m = _DATA_URL.match(url)
    return m.group(1).lower() if m else None


def _part(part: Any, path: str, kinds: frozenset[str]) -> None:
    if not isinstance(part, dict) or not _one_of(part.get("type"), kinds):
        raise _fail(f"{path}.type", f"must be one of: {', '.join(sorted(kinds))}")
    kind = part["type"]
    if kind == "text":
        _keys(part, path, frozenset({"type", "text"}), ("text",))
        if not isinstance(part["text"], str):
            raise _fail(f"{path}.text", "must be a string")
    elif kind == "image_url":
        _keys(part, path, frozenset({"type", "image_url"}), ("image_url",))
        image = part["image_url"]
        _keys(image, f"{path}.image_url", frozenset({"url", "detail"}), ("url",))
        url = _nonempty_str(image["url"], f"{path}.image_url.url")
        mime = data_url_mime(url)
        if mime is None and not url.startswith(("https://", "http://")):
            raise _fail(f"{path}.image_url.url", "must be an http(s) URL or a data:<mime>;base64, URL")
        if mime is not None and not mime.startswith("image/"):
            raise _fail(f"{path}.image_url.url", f"is a data URL of {mime}, not of an image")
        if "detail" in image and not _one_of(image["detail"], _DETAILS):
            raise _fail(f"{path}.image_url.detail", "must be auto, low or high")
    else:  # file
        _keys(part, path, frozenset({"type", "file"}), ("file",))
        file = part["file"]
        _keys(file, f"{path}.file", frozenset({"file_data", "filename"}), ("file_data",))
        data = _nonempty_str(file["file_data"], f"{path}.file.file_data")
        if data_url_mime(data) is None:
            raise _fail(f"{path}.file.file_data", "must be a data:<mime>;base64, URL")
        if "filename" in file:
            _nonempty_str(file["filename"], f"{path}.file.filename", limit=_MAX_ID)


_TEXT_ONLY = frozenset({"text"})
_USER_PARTS = frozenset({"text", "image_url", "file"})


def _content(value: Any, path: str, kinds: frozenset[str], *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, str):
        if not value and not optional:
            raise _fail(path, "must not be empty")
        return
    if not isinstance(value, list) or (not value and not optional):
        raise _fail(path, "must be a non-empty string or array of content parts")
    if len(value) > MAX_PARTS:
        raise _fail(path, f"has more than {MAX_PARTS} parts")
    for j, part in enumerate(value):
        _part(part, f"{path}[{j}]", kinds)


def content_text(content: Any) -> str:
    """The text of a content field (a string, or the text parts of an array), joined; "" for None."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _tool_calls(value: Any, path: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _fail(path, "must be a non-empty array")
    if len(value) > MAX_TOOL_CALLS:
        raise _fail(path, f"has more than {MAX_TOOL_CALLS} calls")
    ids: list[str] = []
    for k, call in enumerate(value):
        p = f"{path}[{k}]"
        _keys(call, p, frozenset({"id", "type", "function"}), ("id", "function"))
        if call.get("type", "function") != "function":
            raise _fail(f"{p}.type", 'must be "function"')
        ids.append(_nonempty_str(call["id"], f"{p}.id", limit=_MAX_ID))
        function = call["function"]
        _keys(function, f"{p}.function", frozenset({"name", "arguments"}), ("name", "arguments"))
        _nonempty_str(function["name"], f"{p}.function.name", limit=_MAX_ID)
        if not isinstance(function["arguments"], str):
            raise _fail(f"{p}.function.arguments", "must be a string (the arguments as JSON)")
    if len(set(ids)) != len(ids):
        raise _fail(path, "has two calls with the same id")
    return ids


_COMMON = frozenset({"role", "content", "name"})
_ALLOWED = {
    "system": _COMMON,
    "developer": _COMMON,
    "user": _COMMON,
    "assistant": _COMMON | {"tool_calls", "reasoning", "refusal", "provider_state"},
    "tool": frozenset({"role", "content", "tool_call_id"}),
}


def _assistant(m: dict[str, Any], path: str) -> set[str]:
    """Check an assistant message; the ids of its tool calls."""
    calls = _tool_calls(m["tool_calls"], f"{path}.tool_calls") if m.get("tool_calls") is not None else []
    _content(m.get("content"), f"{path}.content", _TEXT_ONLY, optional=True)
    for extra in ("reasoning", "refusal"):
        if m.get(extra) is not None and not isinstance(m[extra], str):
            raise _fail(f"{path}.{extra}", "must be a string")
    state = m.get("provider_state")
    if state is not None and not isinstance(state, dict):
        raise _fail(f"{path}.provider_state", "must be an object (as done.message gave it)")
    # An empty answer (cancelled before anything, or all its output spent on reasoning) is what done.message gives:
    # it is taken back as it came, and each provider leaves it out.
    return set(calls)


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit`: it is stored and sent on re-encoded, and encoders stop far sooner than
    parsers (orjson: 255 levels against 1024)."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())]
        if not level:
            return
    raise ChatError("invalid_body", f"the body is nested deeper than {limit} levels")


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """Validate `messages`; returned as given. Tool results must answer a call of the assistant message before them."""
    if not isinstance(raw, list) or not raw:
        raise ChatError("invalid_messages", "messages must be a non-empty array")
    if len(raw) > MAX_MESSAGES:
        raise ChatError("invalid_messages", f"messages has more than {MAX_MESSAGES} entries")
    open_calls: set[str] = set()  # ids of the latest assistant message's calls not yet answered
    asked_at = 0  # the index of that message
    for i, m in enumerate(raw):
        path = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if not _one_of(role, ROLES):
            raise _fail(f"{path}.role", "must be system, developer, user, assistant or tool")
        _keys(m, path, _ALLOWED[role])
        if "name" in m:
            _nonempty_str(m["name"], f"{path}.name", limit=64)
        if role == "tool":
            call_id = _nonempty_str(m.get("tool_call_id"), f"{path}.tool_call_id", limit=_MAX_ID)
            if call_id not in open_calls:
                raise _fail(f"{path}.tool_call_id", "answers no call of the assistant message before it")
            open_calls.discard(call_id)
            _content(m.get("content"), f"{path}.content", _TEXT_ONLY)
            continue
        if open_calls:
            # Every provider wants each call answered before the conversation goes on.
            raise _fail(path, f"comes before every tool call of messages[{asked_at}] has its tool result")
        if role == "assistant":
            open_calls, asked_at = _assistant(m, path), i
        else:
            _content(m.get("content"), f"{path}.content", _USER_PARTS if role == "user" else _TEXT_ONLY)
    if open_calls:
        raise _fail(f"messages[{asked_at}].tool_calls", "need their tool results (role tool) after them")
    if all(m["role"] in ("system", "developer") for m in raw):
        raise ChatError("invalid_messages", "messages need at least one user or assistant message")
    return raw


def parse_tools(raw: Any) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ChatError("invalid_tools", "tools must be a non-empty array")
    if len(raw) > MAX_TOOLS:
        raise ChatError("invalid_tools", f"tools has more than {MAX_TOOLS} entries")
    names: set[str] = set()
    for i, tool in enumerate(raw):
        path = f"tools[{i}]"
        _keys(tool, path, frozenset({"type", "function"}), ("type", "function"), code="invalid_tools")
        if tool["type"] != "function":
            raise _fail(f"{path}.type", 'must be "function"', "invalid_tools")
        function = tool["function"]
        allowed = frozenset({"name", "description", "parameters", "strict"})
        _keys(function, f"{path}.function", allowed, ("name",), code="invalid_tools")
        name = function["name"]
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _fail(f"{path}.function.name", "must be 1-64 characters of A-Z a-z 0-9 _ -", "invalid_tools")
        if name in names:
            raise _fail(f"{path}.function.name", f"repeats {name!r}", "invalid_tools")
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise _fail(f"{path}.function.description", "must be a string", "invalid_tools")
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type", "object") != "object"
        ):
            raise _fail(f"{path}.function.parameters", 'must be a JSON Schema of "type": "object"', "invalid_tools")
        if "strict" in function and not isinstance(function["strict"], bool):
            raise _fail(f"{path}.function.strict", "must be true or false", "invalid_tools")
    return raw


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    return {t["function"]["name"] for t in tools or ()}


def parse_tool_choice(raw: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
    if raw is None:
        return None
    if raw in ("auto", "none", "required"):
        if raw == "required" and not tools:
            raise ChatError("invalid_tools", 'tool_choice "required" needs tools')
        return str(raw)
    if isinstance(raw, dict):
        _keys(raw, "tool_choice", frozenset({"type", "function"}), ("type", "function"), code="invalid_tools")
        function = raw["function"]
        if raw["type"] == "function" and isinstance(function, dict) and set(function) == {"name"}:
            if not isinstance(function["name"], str) or function["name"] not in tool_names(tools):
                raise ChatError("invalid_tools", "tool_choice.function.name names no tool in tools")
            return raw
    raise ChatError(
        "invalid_tools", 'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name"}}'
    )


def parse_response_format(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    code = "invalid_response_format"
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind in ("text", "json_object"):
        _keys(raw, "response_format", frozenset({"type"}), code=code)
        return None if kind == "text" else {"type": "json_object"}
    if kind == "json_schema":
        _keys(raw, "response_format", frozenset({"type", "json_schema"}), ("json_schema",), code=code)
        spec = raw["json_schema"]
        allowed = frozenset({"name", "schema", "strict", "description"})
        _keys(spec, "response_format.json_schema", allowed, ("name", "schema"), code=code)
        name = spec["name"]
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _fail("response_format.json_schema.name", "must be 1-64 characters of A-Z a-z 0-9 _ -", code)
        if not isinstance(spec["schema"], dict):
            raise _fail("response_format.json_schema.schema", "must be a JSON Schema object", code)
        if "strict" in spec and not isinstance(spec["strict"], bool):
            raise _fail("response_format.json_schema.strict", "must be true or false", code)
        return {"type": "json_schema", "json_schema": spec}
    raise ChatError(code, 'response_format.type must be "text", "json_object" or "json_schema"')


def parse_parallel_tool_calls(raw: Any) -> bool | None:
    if raw is not None and not isinstance(raw, bool):
        raise ChatError("invalid_tools", "parallel_tool_calls must be true or false")
    return raw


def parse_reasoning_effort(raw: Any) -> str | None:
    if raw is None:
        return None
    if raw not in EFFORTS:
        raise ChatError("invalid_params", f"reasoning_effort must be one of: {', '.join(EFFORTS)}")
    return str(raw)


def assistant_state(message: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """What an assistant message's `provider_state` holds for one provider kind ({} if nothing)."""
    state = message.get("provider_state")
    own = state.get(kind) if isinstance(state, dict) else None
    return own if isinstance(own, dict) else {}
