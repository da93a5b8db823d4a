"""The one SSE codec: encode events to wire bytes, and parse a byte stream back as the WHATWG spec does.

Used by the hub to write streams, and by tests, producers and the load tester to read them.
No aiohttp import here, so any process can reuse it.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEParser", "comment", "encode_event", "event_id", "retry"]

# The WHATWG parser treats CRLF, lone CR and lone LF each as one line end; splitting data the same way
# is what makes `data:` lines round-trip exactly.
_LINE_END = re.compile(r"\r\n|\r|\n")
# Characters that would end a field early or be dropped by the parser: never let them into `id:` or `event:`.
_FIELD_FORBIDDEN = re.compile(r"[\r\n\x00]")


def encode_event(event_id: str, event: str, data: str) -> bytes:
    """Encode one event as SSE bytes: `id:`, `event:`, one `data:` line per line of `data`, blank line.

    `event_id` and `event` must already be validated (no CR, LF or NUL); this is asserted cheaply
    because a violation would let a publisher forge events.
    """
    if _FIELD_FORBIDDEN.search(event_id) or _FIELD_FORBIDDEN.search(event):
        raise ValueError("SSE id and event name must not contain CR, LF or NUL")
    parts = [f"id: {event_id}\nevent: {event}\n"]
    for line in _LINE_END.split(data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    # A lone surrogate cannot come from valid JSON input; should one get here, it must not crash a fan-out.
    return "".join(parts).encode("utf-8", "replace")


def comment(text: str = "") -> bytes:
    """An SSE comment line (ignored by clients; used for keep-alives and to flush proxies)."""
    return f": {_LINE_END.sub(' ', text)}\n\n".encode() if text else b":\n\n"


def event_id(value: str) -> bytes:
    """A block with only an `id:` field: it sets the client's last event id without dispatching an event."""
    if _FIELD_FORBIDDEN.search(value):
        raise ValueError("SSE id must not contain CR, LF or NUL")
    return f"id: {value}\n\n".encode()


def retry(ms: int) -> bytes:
    """The `retry:` field, the reconnection delay hint for EventSource."""
    return f"retry: {int(ms)}\n\n".encode()


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event, as an EventSource would see it."""

    data: str
    event: str = "message"
    id: str = ""
    retry_ms: int | None = None


class SSEParser:
    """Incremental parser following the WHATWG "event stream interpretation" algorithm.

    Feed it bytes as they arrive (split anywhere, even inside a UTF-8 sequence or between CR and LF);
    it returns the events completed so far. `last_event_id` persists across events as in EventSource. `comments`
    counts the comment lines read (EventSource ignores them; a client may take one as a sign the stream is live).
    """

    __slots__ = (
        "_buf",
        "_data",
        "_decoder",
        "_event",
        "_id_buf",
        "_seen_cr",
        "_started",
        "comments",
        "last_event_id",
        "retry_ms",
    )

    def __init__(self) -> None:
        self._buf = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._seen_cr = False
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._id_buf: str | None = None
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._decode(chunk)
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if not text:
            return []
        if self._seen_cr and text.startswith("\n"):
            # The LF of a CRLF pair that was split across chunks: the line already ended at the CR.
            text = text[1:]
        self._seen_cr = False
        buf = self._buf + text
        events: list[SSEEvent] = []
        start = 0
        n = len(buf)
        while start < n:
            cr = buf.find("\r", start)
            lf = buf.find("\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, nxt = lf, lf + 1
            elif cr + 1 < n:
                end, nxt = cr, cr + 2 if buf[cr + 1] == "\n" else cr + 1
            else:
                # CR at the very end: the line ends here; a following LF in the next chunk belongs to it.
                end, nxt = cr, cr + 1
                self._seen_cr = True
            ev = self._line(buf[start:end])
            if ev is not None:
                events.append(ev)
            start = nxt
        self._buf = buf[start:]
        return events

    def _decode(self, chunk: bytes) -> str:
        # The incremental decoder keeps an incomplete trailing UTF-8 sequence for the next chunk.
        return self._decoder.decode(chunk)

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id_buf = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if self._id_buf is not None:
            self.last_event_id = self._id_buf
            self._id_buf = None
        if not self._data:
            self._event = ""
            return None
        ev = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self.last_event_id)
        self._data = []
        self._event = ""
        return ev
