"""Just enough HTTP/1.1 for the subscriber client on raw asyncio streams: the GET request, the response head, and the
body framing (chunked, Content-Length, or until close).

An HTTP client library costs far more memory and CPU per connection than the bytes need; the load tester must stay
cheaper than the hub it measures. aiohttp's server sends SSE with `Transfer-Encoding: chunked`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

__all__ = [
    "BodyDecoder",
    "ChunkedDecoder",
    "CloseDelimitedDecoder",
    "Endpoint",
    "HttpError",
    "LengthDecoder",
    "ResponseHead",
    "body_decoder",
    "build_get",
    "parse_head",
]

# Longest chunk-size line (with extensions) or trailer line accepted: a real server sends a few bytes.
_MAX_LINE = 4096
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: (.*))?")


class HttpError(Exception):
    """The server's bytes are not valid HTTP/1.1 as this client reads it."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a URL points: scheme, host, port and the request target (path and query)."""

    scheme: str
    host: str
    port: int
    target: str

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port, target)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def build_get(endpoint: Endpoint, headers: dict[str, str]) -> bytes:
    """The bytes of a GET request for an event stream, with `headers` added."""
    lines = [
        f"GET {endpoint.target} HTTP/1.1",
        f"Host: {endpoint.host_header}",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "


def parse_head(raw: bytes) -> ResponseHead:
    """Parse a response head: the status line and fields, up to and including the blank line."""
    text = raw.decode("latin-1")
    if not text.endswith("\r\n\r\n"):
        raise HttpError("response head does not end with a blank line")
    lines = text[:-4].split("\r\n")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise HttpError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"bad header line {line[:80]!r}")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return ResponseHead(int(m.group(1)), m.group(2) or "", headers)


class BodyDecoder(Protocol):
    """Turns the bytes after the head into body bytes. `done` is set once the body ended by its own framing."""

    done: bool

    def feed(self, data: bytes) -> bytes: ...


def body_decoder(head: ResponseHead) -> BodyDecoder:
    """The decoder for this response's framing (RFC 9112 §6.3: chunked wins over Content-Length)."""
    te = head.headers.get("transfer-encoding", "")
    if te:
        if te.split(",")[-1].strip().lower() != "chunked":
            raise HttpError(f"unsupported transfer-encoding {te!r}")
        return ChunkedDecoder()
    if "content-length" in head.headers:
        try:
            return LengthDecoder(int(head.headers["content-length"]))
        except ValueError:
            raise HttpError("bad content-length") from None
    return CloseDelimitedDecoder()


class CloseDelimitedDecoder:
    """A body that runs until the server closes the connection."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> bytes:
        return data


class LengthDecoder:
    """A body of Content-Length bytes; anything after them is not part of it."""

    __slots__ = ("done", "remaining")

    def __init__(self, length: int) -> None:
        if length < 0:
            raise HttpError("negative content-length")
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> bytes:
        take = data[: self.remaining]
        self.remaining -= len(take)
        self.done = self.remaining == 0
        return take


# ChunkedDecoder states.
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Incremental `Transfer-Encoding: chunked` decoder (RFC 9112 §7.1): feed bytes split anywhere, get the body bytes
    completed so far. Chunk extensions are ignored; trailer fields are read and dropped."""

    __slots__ = ("_buf", "_remaining", "_state", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._state = _SIZE
        self._remaining = 0
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    if buf[pos : pos + 1] != b"\r":
                        raise HttpError("chunk data not followed by CRLF")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise HttpError("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _DONE:
                # Bytes after the last chunk belong to no response of ours (we never pipeline).
                raise HttpError("data after the last chunk")
            else:
                nl = buf.find(b"\r\n", pos)
                if nl == -1:
                    if end - pos > _MAX_LINE:
                        raise HttpError("chunk line too long")
                    break
                self._line(buf[pos:nl])
                pos = nl + 2
        self._buf = buf[pos:]
        return b"".join(out)

    def _line(self, line: bytes) -> None:
        if self._state == _TRAILER:
            if not line:
                self._state = _DONE
                self.done = True
            return
        size_text = line.split(b";", 1)[0].rstrip(b" \t")
        if not _HEX.fullmatch(size_text):
            raise HttpError(f"bad chunk size line {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            self._state = _TRAILER
        else:
            self._remaining = size
            self._state = _DATA
