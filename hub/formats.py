"""What the endpoints of other APIs' protocols (hub.chat_completions, hub.responses_api, hub.ai_sdk) share: the
provider and model a request names, and reading a generation channel's events defensively (a channel may hold what
someone published after deleting it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from .errors import ApiError

__all__ = ["NOWHERE", "count", "event_data", "json_response", "provider_model", "text_of"]


def provider_model(model: Any, kinds: Mapping[str, str], default: str) -> tuple[str, str]:
    if not isinstance(model, str) or not model:
        raise ApiError(400, "invalid_model", "model must be <provider>/<model>, or a model of the default provider")
    provider, slash, rest = model.partition("/")
    if slash and provider in kinds:
        return provider, rest
    return default, model


def event_data(raw: str) -> dict[str, Any]:
    """An event's JSON object; {} for anything else (a channel may hold what someone published after deleting it)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def text_of(data: Mapping[str, Any], key: str = "text") -> str:
    value = data.get(key, "")
    return value if isinstance(value, str) else ""


def count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class _Nowhere:
    """Where a stream goes when its events only build a whole answer (`stream_channel(into=...)`)."""

    async def write(self, data: bytes) -> None:
        pass


NOWHERE = _Nowhere()


def json_response(body: object, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)
