"""HTTP plumbing shared by the provider modules: the streaming POST, SSE decoding, and mapping failures to errors.

Every failure of the transport leaves here as a `ProviderError`; the provider modules own only their wire format
(request body, how events decode, how their error bodies read), through the small `StreamDecoder` interface.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from contextlib import aclosing
from datetime import UTC
from typing import Any, Protocol

import aiohttp
import orjson

from producer.providers.base import Finish, GenerationRequest, ProviderConfig, ProviderError, StreamItem
from ssecore.sse import SSEEvent, SSEParser

__all__ = [
    "ErrorClassifier",
    "SSEProvider",
    "StreamDecoder",
    "clean_message",
    "client_timeout",
    "error_object",
    "load_object",
    "parse_duration_s",
    "retry_after_s",
    "status_error",
    "stream_sse",
    "transport_error",
    "truncated",
]

# An error body is read only to find a short message; a proxy's HTML page or a runaway body must not be slurped.
MAX_ERROR_BODY_BYTES = 16 * 1024
MAX_MESSAGE_CHARS = 300

# Key-shaped strings (OpenAI "sk-…", Google "AIza…", Anthropic "sk-ant-…") are masked even when they are not the
# configured key: providers echo partial keys in 401 messages, and a proxy may echo anything.
_KEY_LIKE = re.compile(r"\b(?:sk-[A-Za-z0-9_\-*.]{6,}|AIza[0-9A-Za-z_\-]{20,})")
_SPACES = re.compile(r"\s+")

# status -> (code, retryable). 4xx not listed fall back to bad_request, 5xx to server_error (not retryable).
_STATUS: dict[int, tuple[str, bool]] = {
    400: ("bad_request", False),
    401: ("auth", False),
    402: ("quota_exhausted", False),
    403: ("auth", False),
    404: ("bad_request", False),
    408: ("timeout", True),
    409: ("conflict", True),
    422: ("bad_request", False),
    425: ("conflict", True),
    429: ("rate_limited", True),
    500: ("server_error", True),
    502: ("server_error", True),
    503: ("server_error", True),
    504: ("server_error", True),
    529: ("overloaded", True),
}

# (status, parsed error body or text, response headers) -> the error to raise.
ErrorClassifier = Callable[[int, object, Mapping[str, str]], ProviderError]


class StreamDecoder(Protocol):
    """One provider's reading of its event stream; a fresh instance per request."""

    def feed(self, event: SSEEvent) -> list[StreamItem]:
        """Decode one event. A Finish, if any, is the last item and ends the stream. Raises ProviderError."""
        ...

    def end(self, cut: ProviderError | None) -> Finish:
        """The body ended without a Finish (`cut` says how, None for a clean end of stream).

        Return a Finish when what was received is a complete answer anyway; otherwise raise (`cut` or truncation).
        """
        ...


def client_timeout(config: ProviderConfig) -> aiohttp.ClientTimeout:
    # No total: a long generation is legitimate. Silences are bounded by stream_sse: the first byte may take
    # first_byte_timeout_s, each later one read_timeout_s; aiohttp's own read bound is the longer of the two.
    return aiohttp.ClientTimeout(
        sock_connect=config.connect_timeout_s, sock_read=max(config.read_timeout_s, config.first_byte_timeout_s)
    )


def _first_byte_timeout(config: ProviderConfig) -> ProviderError:
    # The request was sent: the provider may be working on it. Not retried (see ProviderError.accepted).
    return ProviderError("timeout", f"no output within the first-byte timeout ({config.first_byte_timeout_s:g}s)")


def clean_message(message: str, api_key: str | None) -> str:
    """A provider's message made safe to show: the key and key-shaped strings masked, one line, bounded."""
    if api_key:
        message = message.replace(api_key, "[redacted]")
    message = _KEY_LIKE.sub("[redacted]", message)
    message = _SPACES.sub(" ", message).strip()
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return message


def parse_duration_s(value: object) -> float | None:
    """A protobuf JSON Duration ("30s", "1.5s") or a plain number of seconds; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip().removesuffix("s"))
        except ValueError:
            return None
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The server's wait hint: `retry-after-ms` (OpenAI, finer), else `Retry-After` in seconds or as an HTTP-date."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        value = parse_duration_s(ms.removesuffix("s"))
        if value is not None:
            return value / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    if (value := parse_duration_s(raw.removesuffix("s"))) is not None:
        return value
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def status_error(
    status: int,
    message: str,
    headers: Mapping[str, str],
    *,
    code: str | None = None,
    retryable: bool | None = None,
    after_s: float | None = None,
) -> ProviderError:
    """The error for a non-2xx answer; `code`/`retryable` override what the status alone says."""
    default_code, default_retryable = _STATUS.get(status, ("server_error" if status >= 500 else "bad_request", False))
    retry = default_retryable if retryable is None else retryable
    if retry and after_s is None:
        after_s = retry_after_s(headers)
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    return ProviderError(code or default_code, text, status=status, retryable=retry, after_s=after_s if retry else None)


def transport_error(exc: BaseException, during: str) -> ProviderError:
    """An aiohttp or timeout failure as a ProviderError. Timeouts first: aiohttp's are also connection errors."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ProviderError("timeout", f"{during}: connecting timed out", retryable=True)
    if isinstance(exc, TimeoutError):
        return ProviderError("timeout", f"{during}: no data within the read timeout", retryable=True)
    detail = clean_message(str(exc), None) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | OSError):
        return ProviderError("connection", f"{during}: {detail}", retryable=True)
    return ProviderError("bad_response", f"{during}: {detail}")


def truncated(detail: str = "the stream ended before the provider's end marker") -> ProviderError:
    return ProviderError("stream_truncated", detail, retryable=True)


def load_object(data: str) -> dict[str, Any]:
    """One event's JSON payload, which must be an object."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProviderError("bad_response", "a stream event is not valid JSON") from None
    if not isinstance(value, dict):
        raise ProviderError("bad_response", "a stream event is not a JSON object")
    return value


def error_object(body: object) -> dict[str, Any]:
    """The `error` object of an error body, whatever its shape; `{}` when none can be found.

    Shapes seen: `{"error": {...}}` (all three), `[{"error": {...}}]` (Google), `{"error": "text"}` (Ollama),
    `{"detail": "..."}` / `{"message": "..."}` (FastAPI-based compatible servers), and plain text from proxies.
    """
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return err
        for key in ("error", "message", "detail"):
            if isinstance(body.get(key), str):
                return {"message": body[key]}
        return {}
    if isinstance(body, str) and body.strip() and not body.lstrip().startswith("<"):
        # Text, but never an HTML page: its markup says nothing useful and can be long.
        return {"message": body}
    return {}


async def _read_error_body(resp: aiohttp.ClientResponse) -> object:
    chunks: list[bytes] = []
    size = 0
    try:
        while size < MAX_ERROR_BODY_BYTES:
            chunk = await resp.content.readany()
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (aiohttp.ClientError, TimeoutError):
        pass  # The status already says what happened; the body only adds a message.
    raw = b"".join(chunks)[:MAX_ERROR_BODY_BYTES]
    try:
        parsed: object = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
    return parsed


async def _open(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str],
    body: bytes,
    config: ProviderConfig,
    classify: ErrorClassifier,
    by: float,
) -> aiohttp.ClientResponse:
    try:
        async with asyncio.timeout_at(by):
            resp = await session.post(
                url,
                params=config.query or None,
                data=body,
                headers={**headers, **config.extra_headers},
                timeout=client_timeout(config),
                # The caller's session may raise on status; we need the body, so decide here.
                raise_for_status=False,
            )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        if type(exc) is TimeoutError:
            raise _first_byte_timeout(config) from exc
        raise transport_error(exc, "sending the request") from exc
    if 200 <= resp.status < 300 and resp.content_type != "application/json":
        return resp
    async with resp:
        error_body = await _read_error_body(resp)
    if resp.status >= 300:
        raise classify(resp.status, error_body, resp.headers)
    # A compatible server answered the streaming request with one JSON document: say what it said.
    message = clean_message(str(error_object(error_body).get("message") or ""), config.api_key)
    raise ProviderError("bad_response", f"expected an event stream, got JSON {message}".strip(), status=resp.status)


def _decode(parser: SSEParser, decoder: StreamDecoder, chunk: bytes) -> Iterator[StreamItem]:
    for event in parser.feed(chunk):
        yield from decoder.feed(event)


async def stream_sse(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    config: ProviderConfig,
    classify: ErrorClassifier,
    decoder: StreamDecoder,
) -> AsyncGenerator[StreamItem, None]:
    """POST `body` as JSON to `url`, then yield what `decoder` makes of each SSE event, ending with one Finish.

    The response is closed on every exit, including `aclose()` and cancellation: that is what aborts the request.
    """
    # One budget for the answer's head and its first byte.
    first_byte_by = asyncio.get_running_loop().time() + config.first_byte_timeout_s
    raw = orjson.dumps(body)
    resp = await _open(session, url, headers=headers, body=raw, config=config, classify=classify, by=first_byte_by)
    try:
        async with resp, aclosing(_read(resp, decoder, config, first_byte_by)) as items:
            async for item in items:
                yield item
    except ProviderError as e:
        e.accepted = True
        raise


async def _read(
    resp: aiohttp.ClientResponse, decoder: StreamDecoder, config: ProviderConfig, first_byte_by: float
) -> AsyncGenerator[StreamItem, None]:
    finish: Finish | None = None
    cut: ProviderError | None = None
    # Raw bytes into the project's parser: it keeps a UTF-8 sequence or a CRLF split across reads intact.
    parser = SSEParser()
    chunks = resp.content.iter_any()
    loop = asyncio.get_running_loop()
    # Until the answer's first item, then None: a server's early bytes that say nothing (a role chunk, Azure's prompt
    # filter results, pings) do not end the wait of a model that is still thinking.
    deadline: float | None = first_byte_by
    while finish is None:
        try:
            async with asyncio.timeout_at(deadline if deadline is not None else loop.time() + config.read_timeout_s):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if type(exc) is TimeoutError and deadline is not None:
                raise _first_byte_timeout(config) from exc
            cut = transport_error(exc, "reading the stream")
            if cut.code == "connection":
                cut = truncated(f"the connection was lost mid-stream ({type(exc).__name__})")
            break
        # Text is passed on as soon as it is decoded, so what precedes an in-stream error is not lost.
        for item in _decode(parser, decoder, chunk):
            deadline = None
            if isinstance(item, Finish):
                finish = item
                break
            yield item
    # The Finish goes out only after the response is released (by the caller's `async with`): a consumer that stops
    # at the Finish, without exhausting or closing this generator, must not hold the connection.
    if finish is None:
        finish = decoder.end(cut)
    resp.release()
    yield finish


class SSEProvider:
    """What the HTTP providers share: POST a JSON body, read the answer as SSE with the project's parser.

    A provider module subclasses it and says where (`_url`), how (`_headers`, `_body`), how to read its errors
    (`_classify`) and its events (`_decoder`). Adding a provider is one such module.
    """

    name: str
    kind: str
    default_base_url: str  # used when ProviderConfig.base_url is None
    path: str = ""  # appended to the base URL, unless the provider overrides _url
    decoder: Callable[[str | None], StreamDecoder]  # built per stream with the API key (to scrub it from errors)

    def __init__(self, config: ProviderConfig, *, name: str | None = None) -> None:
        """`name`: what jobs call this endpoint, for one named in a providers file (default: the kind's own name)."""
        self._config = config
        self._root = (config.base_url or self.default_base_url).rstrip("/")
        if name is not None:
            self.name = name

    def _url(self, request: GenerationRequest) -> str:
        return self._root + self.path

    def _headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        raise NotImplementedError

    def _classify(self, status: int, body: object, headers: Mapping[str, str]) -> ProviderError:
        raise NotImplementedError

    def _decoder(self) -> StreamDecoder:
        return self.decoder(self._config.api_key)

    async def stream(
        self, session: aiohttp.ClientSession, request: GenerationRequest
    ) -> AsyncGenerator[StreamItem, None]:
        items = stream_sse(
            session,
            self._url(request),
            headers=self._headers(),
            body=self._body(request),
            config=self._config,
            classify=self._classify,
            decoder=self._decoder(),
        )
        # aclosing: closing this generator must close the inner one now, and with it the HTTP response.
        async with aclosing(items):
            async for item in items:
                yield item
