"""The subscriber's HTTP/1.1: chunked decoding split anywhere, chunk extensions and trailers, response heads."""

from __future__ import annotations

import random

import pytest

from loadtest.http1 import (
    ChunkedDecoder,
    CloseDelimitedDecoder,
    Endpoint,
    HttpError,
    LengthDecoder,
    body_decoder,
    build_get,
    parse_head,
)
from ssecore.sse import SSEParser, encode_event

BODY = b"hello, world: \r\n\r\n and \x00 more\n"
# Three chunks (one with extensions, one with whitespace before its extension), the last chunk
# with an extension, and a trailer field.
WIRE = (
    b"5;name=value\r\nhello\r\n"
    b"9\r\n, world: \r\n"
    b'10 ;a="quoted;semicolon";b\r\n\r\n\r\n and \x00 more\n\r\n'
    b"0;last\r\nX-Trailer: yes\r\n\r\n"
)


def _decode(pieces: list[bytes]) -> tuple[bytes, bool]:
    d = ChunkedDecoder()
    out = b""
    for p in pieces:
        out += d.feed(p)
    return out, d.done


def test_chunked_body_is_decoded_with_extensions_and_trailers() -> None:
    assert _decode([WIRE]) == (BODY, True)


def test_chunked_body_split_at_every_byte_position_decodes_the_same() -> None:
    for cut in range(len(WIRE) + 1):
        assert _decode([WIRE[:cut], WIRE[cut:]]) == (BODY, True), cut


def test_chunked_body_fed_one_byte_at_a_time_decodes_the_same() -> None:
    assert _decode([WIRE[i : i + 1] for i in range(len(WIRE))]) == (BODY, True)


def test_chunked_body_split_twice_at_every_pair_of_positions_decodes_the_same() -> None:
    n = len(WIRE)
    for a in range(n + 1):
        for b in range(a, n + 1):
            assert _decode([WIRE[:a], WIRE[a:b], WIRE[b:]]) == (BODY, True), (a, b)


def test_an_unfinished_chunked_body_is_not_done() -> None:
    out, done = _decode([WIRE[: WIRE.index(b"0;last")]])
    assert out == BODY
    assert not done


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\nab\r\n",  # not hex
        b"+5\r\nhello\r\n",  # int() would take it; HTTP does not
        b"0x5\r\nhello\r\n",
        b"5\r\nhelloXY",  # no CRLF after the data
        b"5\r\nhello\rX",
        b"1" * 5000,  # a size line that never ends
        b"0\r\n\r\nextra",  # bytes after the last chunk
    ],
)
def test_malformed_chunking_is_an_error(wire: bytes) -> None:
    with pytest.raises(HttpError):
        ChunkedDecoder().feed(wire)


def test_sse_events_survive_chunking_at_random_boundaries() -> None:
    rng = random.Random(3)
    events = [encode_event(f"1-{i}", "lt", f"data {i}\nline two ü €") for i in range(50)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(wire)), 30))
        pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        decoder, parser = ChunkedDecoder(), SSEParser()
        got = [ev for p in pieces for ev in parser.feed(decoder.feed(p))]
        assert [(e.id, e.event, e.data) for e in got] == [
            (f"1-{i}", "lt", f"data {i}\nline two ü €") for i in range(50)
        ]


def test_response_head_is_parsed_with_lowercase_and_joined_fields() -> None:
    head = parse_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-A: 1\r\nx-a:  2 \r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    assert (head.status, head.reason) == (200, "OK")
    assert head.headers["content-type"] == "text/event-stream"
    assert head.headers["x-a"] == "1, 2"
    assert isinstance(body_decoder(head), ChunkedDecoder)


@pytest.mark.parametrize(
    "raw",
    [b"HTTP/2 200 OK\r\n\r\n", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", b"HTTP/1.1 200 OK\r\n"],
)
def test_malformed_heads_are_errors(raw: bytes) -> None:
    with pytest.raises(HttpError):
        parse_head(raw)


def test_body_framing_follows_the_head() -> None:
    length = body_decoder(parse_head(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"))
    assert isinstance(length, LengthDecoder) and length.done
    d = LengthDecoder(3)
    assert (d.feed(b"ab"), d.done) == (b"ab", False)
    assert (d.feed(b"cdef"), d.done) == (b"c", True)
    assert isinstance(body_decoder(parse_head(b"HTTP/1.0 200 OK\r\n\r\n")), CloseDelimitedDecoder)
    with pytest.raises(HttpError):
        body_decoder(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"))


def test_get_request_names_the_host_and_target() -> None:
    ep = Endpoint.from_url("http://127.0.0.1:8080/v1/channels/a%3Ab/events?last_event_id=0")
    assert (ep.host, ep.port, ep.target) == ("127.0.0.1", 8080, "/v1/channels/a%3Ab/events?last_event_id=0")
    req = build_get(ep, {"Authorization": "Bearer t"})
    assert req.startswith(b"GET /v1/channels/a%3Ab/events?last_event_id=0 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
    assert b"\r\nAuthorization: Bearer t\r\n" in req and req.endswith(b"\r\n\r\n")
    assert Endpoint.from_url("https://example.com/x").host_header == "example.com"
    assert Endpoint.from_url("http://[::1]:81/").host_header == "[::1]:81"


def test_chunk_sizes_are_hex_in_either_case_with_leading_zeros() -> None:
    assert _decode([b"A\r\n0123456789\r\n00b\r\nabcdefghijk\r\n0\r\n\r\n"]) == (b"0123456789abcdefghijk", True)
