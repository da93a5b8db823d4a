"""Targets: what the load tester needs to know about one kind of SSE server — its URL templates, when a fresh stream
is ready, and how to publish. Our hub's adapter and Nchan's live here; another server is one more class in `ADAPTERS`.

The event data is the same for every target (`encode_data`): the publisher's send time and a per-channel sequence
number, so the subscriber can measure latency and account for every event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Protocol
from urllib.parse import quote

import aiohttp
import orjson

from ssecore.sse import SSEParser

__all__ = ["ADAPTERS", "Adapter", "HubAdapter", "NchanAdapter", "PublishError", "decode_data", "encode_data"]


class PublishError(Exception):
    """A publish request the server did not accept; `reason` is short and countable (`http_503`, `timeout`, …).

    `accepted`: how many of the request's events the server had stored before it failed (a target whose batch is
    not atomic); the publisher counts them and does not reuse their sequence numbers."""

    def __init__(self, reason: str, detail: str = "", *, accepted: int = 0) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.accepted = accepted


def encode_data(sent_s: float, seq: int, padding: str) -> str:
    """The data of one load-test event: send time (Unix seconds), sequence number in its channel, padding."""
    return orjson.dumps({"t": sent_s, "s": seq, "p": padding}).decode()


def decode_data(text: str) -> tuple[float, int] | None:
    """(send time, sequence number) of a load-test event's data; None when the data is not ours."""
    try:
        d = orjson.loads(text)
        sent, seq = d["t"], d["s"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if type(seq) is not int or not isinstance(sent, int | float):
        return None
    return float(sent), seq


class Adapter(Protocol):
    name: ClassVar[str]
    event_name: ClassVar[str]  # the SSE event name load-test events arrive under

    def subscribe_url(self, base: str, channel: str) -> str: ...

    def stream_ready(self, parser: SSEParser) -> bool:
        """Whether the bytes parsed so far show the stream is live, so events published from now on will arrive."""
        ...

    async def publish(
        self, session: aiohttp.ClientSession, base: str, channel: str, datas: Sequence[str], headers: Mapping[str, str]
    ) -> int:
        """Append `datas` to `channel`, in order, in one request; return how many the server accepted.
        Raises PublishError (or aiohttp.ClientError, TimeoutError) when it did not."""
        ...


class HubAdapter:
    """This project's hub: `POST` a JSON list to `{base}/v1/channels/{channel}/events`, answered `201 {"ids"}`."""

    name: ClassVar[str] = "hub"
    event_name: ClassVar[str] = "lt"
    subscribe_template: ClassVar[str] = "{base}/v1/channels/{channel}/events"
    publish_template: ClassVar[str] = "{base}/v1/channels/{channel}/events"

    def subscribe_url(self, base: str, channel: str) -> str:
        return self.subscribe_template.format(base=base.rstrip("/"), channel=quote(channel, safe=""))

    def stream_ready(self, parser: SSEParser) -> bool:
        # A live stream's preamble ends with an `id: <position>` block; everything appended after that position
        # reaches this stream, so once the parser has taken that id the subscription is in place.
        return parser.last_event_id != ""

    async def publish(
        self, session: aiohttp.ClientSession, base: str, channel: str, datas: Sequence[str], headers: Mapping[str, str]
    ) -> int:
        url = self.publish_template.format(base=base.rstrip("/"), channel=quote(channel, safe=""))
        body = orjson.dumps([{"event": self.event_name, "data": d} for d in datas])
        async with session.post(url, data=body, headers={**headers, "Content-Type": "application/json"}) as resp:
            raw = await resp.read()
            if resp.status != 201:
                raise PublishError(f"http_{resp.status}", raw[:200].decode("utf-8", "replace"))
        try:
            ids = orjson.loads(raw)["ids"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise PublishError("bad_answer", raw[:200].decode("utf-8", "replace")) from None
        if not isinstance(ids, list) or len(ids) != len(datas):
            raise PublishError("bad_answer", f"{len(datas)} events sent, answer {raw[:200]!r}")
        return len(ids)


class NchanAdapter:
    """Nchan (nginx module), configured as in `bench/nchan.conf.template`: EventSource subscribers at
    `{base}/sub/{channel}`, publishers at `{base}/pub/{channel}`, memory store.

    Nchan takes one message per HTTP request (the body is the message), so a batch of N is N requests, one after the
    other on one connection, in order. Each carries `X-EventSource-Event`, which Nchan stores with the message and
    sends as its `event:` line. The answer is `201` when the channel had subscribers, `202` when it had none.
    """

    name: ClassVar[str] = "nchan"
    event_name: ClassVar[str] = "lt"
    subscribe_template: ClassVar[str] = "{base}/sub/{channel}"
    publish_template: ClassVar[str] = "{base}/pub/{channel}"

    def subscribe_url(self, base: str, channel: str) -> str:
        return self.subscribe_template.format(base=base.rstrip("/"), channel=quote(channel, safe=""))

    def stream_ready(self, parser: SSEParser) -> bool:
        # Nchan answers an EventSource request with its head and the comment `: hi`, in one write, only once the
        # subscriber is enqueued on the channel (nchan's es_enqueue); no `id:` or `retry:` comes before the first
        # message. So the first whole comment line is the sign.
        return parser.comments > 0

    async def publish(
        self, session: aiohttp.ClientSession, base: str, channel: str, datas: Sequence[str], headers: Mapping[str, str]
    ) -> int:
        url = self.publish_template.format(base=base.rstrip("/"), channel=quote(channel, safe=""))
        request_headers = {**headers, "Content-Type": "text/plain", "X-EventSource-Event": self.event_name}
        # Strictly one after the other: two requests in flight could be stored in either order. Unlike the hub's
        # batch this is not atomic: a failure part-way says how many were stored before it (`accepted`).
        for k, data in enumerate(datas):
            try:
                async with session.post(url, data=data.encode(), headers=request_headers) as resp:
                    raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                reason = "timeout" if isinstance(e, TimeoutError) else type(e).__name__
                raise PublishError(reason, str(e), accepted=k) from e
            if resp.status not in (201, 202):
                raise PublishError(f"http_{resp.status}", raw[:200].decode("utf-8", "replace"), accepted=k)
        return len(datas)


ADAPTERS: dict[str, type[Adapter]] = {HubAdapter.name: HubAdapter, NchanAdapter.name: NchanAdapter}
