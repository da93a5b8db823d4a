"""JSON request bodies: read within --body-timeout, parsed, and accepted only when everything after can carry them
exactly."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import orjson
from aiohttp import web

from .errors import ApiError
from .settings import HubSettings

__all__ = ["parse_json", "read_body"]

# Integers orjson keeps exact (signed and unsigned 64 bits); beyond them it silently makes a float of the number.
_INT_MIN, _INT_END = -(2**63), 2**64
# Only a run of 19 digits or more can be out of that range (-2**63 - 1 has 19): bodies without one skip the check.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


class _OutOfRange(ValueError):
    pass


async def read_body(request: web.Request, settings: HubSettings) -> bytes:
    """The request body, within --body-timeout: a body that never finishes must not hold a handler for ever."""
    if request.content.is_eof():
        # All of it came with the head, as a small publish's does: nothing to wait for, so no timer to arm.
        return await request.read()
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"the body did not arrive within {settings.body_timeout_s:g} s",
            {"Connection": "close"},
        ) from None


def parse_json(raw: bytes) -> Any:
    """The body's JSON value, or ApiError 400 `invalid_json`: not JSON, or holding an integer that would silently lose
    digits."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if _LONG_DIGITS.search(raw) is not None:
        try:
            # The standard parser hands each integer literal over as text, before it becomes a number.
            json.loads(raw, parse_int=_exact_int)
        except _OutOfRange:
            raise ApiError(
                400,
                "invalid_json",
                "the body holds an integer beyond 64 bits, which would lose digits; send it as a string",
            ) from None
        except RecursionError:
            # Nested near orjson's 1024 levels: far deeper than any request of this API can be (events are encoded
            # again, which orjson does to 254 levels only).
            raise ApiError(400, "invalid_json", "the body nests arrays and objects too deeply") from None
    return body


def _exact_int(text: str) -> int:
    # Python refuses to convert more than 4300 digits; anything over 20 (and a sign) is out of range anyway.
    if len(text) > 21 or not _INT_MIN <= (value := int(text)) < _INT_END:
        raise _OutOfRange(text[:40])
    return value
