"""Authentication, authorization and CORS of the HTTP API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.__main__ import create_node
from hub.auth import Principal, glob_match
from hub.settings import HubSettings
from ssecore.backend import Backend
from tests.conftest import ClientFactory
from tests.support import collect

Client = TestClient[Any, Any]
SECRET = "s" * 64
API_KEY = "svc-key-0123456789abcdef"
OLD_API_KEY = "old-key-0123456789abcdef"


def token(key: Any = SECRET, alg: str = "HS256", **claims: Any) -> str:
    body = {"sub": "alice", "exp": time.time() + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg)


def _hs256_by_hand(claims: dict[str, Any], secret: bytes) -> str:
    # PyJWT refuses to do this; an attacker would not.
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + b"." + b64(orjson.dumps(claims))
    return (signing_input + b"." + b64(hmac.new(secret, signing_input, hashlib.sha256).digest())).decode()


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


@pytest.fixture
async def hub(make_client: ClientFactory, backend: Backend) -> Client:
    return await make_client(
        backend,
        anonymous=False,
        jwt_secret=SECRET,
        api_keys=f"svc {API_KEY} chat:*,gen:*; old {OLD_API_KEY} chat:1",
        cors_origins="https://app.example",
    )


async def test_no_credentials_is_401_with_a_bearer_challenge(hub: Client) -> None:
    for method, path in [
        ("GET", "/v1/channels/c/events"),
        ("POST", "/v1/channels/c/events"),
        ("GET", "/v1/channels/c"),
        ("DELETE", "/v1/channels/c"),
        ("POST", "/v1/generations"),
        ("GET", "/v1/generations/x"),
    ]:
        resp = await hub.request(method, path, json={"data": 1})
        assert resp.status == 401, (method, path)
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="hub"')
        assert (await resp.json())["error"] == "unauthorized"


# Tokens are made when each test runs: one minted at collection would have its `nbf` behind it by then on a slow run.
@pytest.mark.parametrize(
    "bad",
    [
        lambda: token(key="x" * 64),  # another secret
        lambda: token(exp=time.time() - 60),  # expired beyond the leeway
        lambda: token(nbf=time.time() + 60),  # not yet valid
        lambda: token(sub=None),  # no subject
        lambda: token(subscribe="chat:*"),  # claims of the wrong type
        lambda: token(subscribe=[1]),
        lambda: "not.a.jwt",
        lambda: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS512"),  # an algorithm this hub does not accept
    ],
)
async def test_invalid_tokens_are_401_invalid_token(hub: Client, bad: Callable[[], str]) -> None:
    resp = await hub.get("/v1/channels/chat:1/events", headers=bearer(bad()))
    assert resp.status == 401
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_patterns_decide_what_a_token_may_read_and_write(hub: Client) -> None:
    t = token(subscribe=["user:alice:*", "lobby"], publish=["user:alice:*"])
    ok = await hub.post("/v1/channels/user:alice:1/events", json={"data": "hi"}, headers=bearer(t))
    assert ok.status == 201
    for path in ("/v1/channels/user:bob:1/events", "/v1/channels/lobby/events"):
        resp = await hub.post(path, json={"data": "x"}, headers=bearer(t))
        assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    stream = await hub.get("/v1/channels/user:alice:1/events?last_event_id=0", headers=bearer(t))
    assert stream.status == 200
    assert [e.data for e in await collect(stream, count=1)] == ["hi"]
    stream.close()
    assert (await hub.get("/v1/channels/user:bob:1/events", headers=bearer(t))).status == 403
    assert (await hub.get("/v1/channels/lobbyist/events", headers=bearer(t))).status == 403  # exact, not prefix
    assert (await hub.get("/v1/channels/user:alice:1", headers=bearer(t))).status == 200
    assert (await hub.delete("/v1/channels/user:alice:1", headers=bearer(t))).status == 204


async def test_token_from_query_or_cookie_for_eventsource_and_header_wins(hub: Client) -> None:
    good = token(subscribe=["c"])
    assert (await hub.get(f"/v1/channels/c/events?access_token={good}")).status == 200
    assert (await hub.get("/v1/channels/c/events", cookies={"hub_token": good})).status == 200
    resp = await hub.get(f"/v1/channels/c/events?access_token={good}", headers=bearer("not.a.jwt"))
    assert resp.status == 401


async def test_audience_and_issuer_are_checked_when_configured(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, anonymous=False, jwt_secret=SECRET, jwt_audience="hub", jwt_issuer="auth.example")
    good = token(aud="hub", iss="auth.example", subscribe=["c"])
    assert (await hub.get("/v1/channels/c", headers=bearer(good))).status == 404  # allowed; the channel is absent
    for bad in (token(aud="other", iss="auth.example"), token(aud="hub", iss="evil"), token(subscribe=["c"])):
        assert (await hub.get("/v1/channels/c", headers=bearer(bad))).status == 401


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
async def test_public_key_tokens_and_no_algorithm_confusion(
    make_client: ClientFactory, backend: Backend, tmp_path: Path, kind: str
) -> None:
    private: Any = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(pem)
    hub = await make_client(backend, anonymous=False, jwt_public_key=str(key_file))
    good = token(key=private, alg=kind, subscribe=["c"])
    assert (await hub.get("/v1/channels/c", headers=bearer(good))).status == 404
    # The public key is public: a token "signed" with it as an HMAC secret must not pass.
    forged = _hs256_by_hand({"sub": "mallory", "subscribe": ["*"]}, pem)
    assert (await hub.get("/v1/channels/c", headers=bearer(forged))).status == 401


def _key_pair(kind: str) -> tuple[Any, bytes]:
    private: Any = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, pem


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(("configured", "claimed"), [("RS256", "ES256"), ("ES256", "RS256")])
async def test_a_token_of_the_other_key_family_is_an_invalid_token(
    make_client: ClientFactory,
    backend: Backend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    configured: str,
    claimed: str,
) -> None:
    _, pem = _key_pair(configured)
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(pem)
    hub = await make_client(backend, anonymous=False, jwt_public_key=str(key_file))
    # Signed with a key of the other family: its header names an algorithm the configured key cannot verify.
    other, _ = _key_pair(claimed)
    resp = await hub.get("/v1/channels/c", headers=bearer(token(key=other, alg=claimed, subscribe=["c"])))
    assert resp.status == 401
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert _errors(caplog) == []


async def _raw_status(client: Client, head: bytes) -> int:
    """Send a request head as bytes (aiohttp's client would refuse to send what a hostile one does): its status."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(head + b"Host: hub\r\nConnection: close\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/channels/c HTTP/1.1\r\nAuthorization: Bearer ab\xffcd\r\n",
        b"GET /v1/channels/c HTTP/1.1\r\nAuthorization: Bearer " + API_KEY[:-1].encode() + b"\xe9\r\n",
        b"GET /v1/channels/c HTTP/1.1\r\nCookie: hub_token=ab\xffcd\r\n",
        b"GET /v1/channels/c?access_token=ab%FFcd HTTP/1.1\r\n",
    ],
    ids=["bearer", "bearer-like-a-key", "cookie", "query"],
)
async def test_a_token_that_is_not_utf8_is_an_invalid_token(
    hub: Client, caplog: pytest.LogCaptureFixture, head: bytes
) -> None:
    assert await _raw_status(hub, head) == 401
    assert _errors(caplog) == []


async def test_api_keys_publish_within_their_patterns_and_rotate(hub: Client) -> None:
    assert (await hub.post("/v1/channels/chat:9/events", json={"data": 1}, headers=bearer(API_KEY))).status == 201
    assert (await hub.post("/v1/channels/other/events", json={"data": 1}, headers=bearer(API_KEY))).status == 403
    assert (await hub.post("/v1/channels/chat:1/events", json={"data": 1}, headers=bearer(OLD_API_KEY))).status == 201
    assert (await hub.post("/v1/channels/chat:2/events", json={"data": 1}, headers=bearer(OLD_API_KEY))).status == 403
    wrong = await hub.post("/v1/channels/chat:9/events", json={"data": 1}, headers=bearer(API_KEY[:-1] + "X"))
    assert wrong.status == 401
    # Keys publish; they do not read streams.
    assert (await hub.get("/v1/channels/chat:9/events", headers=bearer(API_KEY))).status == 403


async def test_a_stream_ends_when_its_token_expires(hub: Client) -> None:
    # Accepted within the 10 s clock-skew leeway, and ended when that runs out, about 2 s from now.
    t = token(exp=time.time() - 8, subscribe=["c"])
    started = time.monotonic()
    resp = await hub.get("/v1/channels/c/events", headers=bearer(t))
    assert resp.status == 200
    await collect(resp, timeout_s=10)  # returns when the hub ends the response
    assert 1.0 < time.monotonic() - started < 6


@pytest.mark.slow
async def test_generations_need_publish_rights_on_their_channel(hub: Client) -> None:
    body = {"provider": "demo", "model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    denied = await hub.post("/v1/generations", json=body, headers=bearer(token(publish=["chat:*"])))
    assert denied.status == 403
    ok = await hub.post("/v1/generations", json=body, headers=bearer(API_KEY))
    assert ok.status == 202
    gid = (await ok.json())["id"]
    # Its creator reaches it; another client only with a token naming its channel (see test_ownership), and one that
    # cannot is told what an unknown id tells.
    assert (await hub.get(f"/v1/generations/{gid}", headers=bearer(API_KEY))).status == 200
    assert (await hub.get(f"/v1/generations/{gid}", headers=bearer(token(subscribe=["gen:*"])))).status == 404
    assert (await hub.get(f"/v1/generations/{gid}", headers=bearer(token(subscribe=[f"gen:{gid}"])))).status == 200
    assert (await hub.get(f"/v1/generations/{gid}", headers=bearer(token(subscribe=["chat:*"])))).status == 404
    assert (await hub.delete(f"/v1/generations/{gid}", headers=bearer(token(subscribe=["gen:*"])))).status == 404


async def test_operational_endpoints_need_no_token(hub: Client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await hub.get(path)).status == 200


async def test_cors_allows_configured_origins_exactly_with_credentials(hub: Client) -> None:
    origin = "https://app.example"
    resp = await hub.get("/v1/channels/c/events", headers={"Origin": origin, **bearer(token(subscribe=["c"]))})
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert resp.headers["Access-Control-Allow-Credentials"] == "true" and "Origin" in resp.headers["Vary"]
    resp.close()
    other = await hub.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    pre = await hub.options(
        "/v1/channels/c/events",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert pre.status == 204
    assert "Last-Event-ID" in pre.headers["Access-Control-Allow-Headers"]
    assert pre.headers["Access-Control-Allow-Origin"] == origin
    denied = await hub.options("/v1/channels/c/events", headers={"Origin": "https://evil.example"})
    assert denied.status == 403 and "Access-Control-Allow-Origin" not in denied.headers


async def test_cors_wildcard_never_allows_credentials(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, cors_origins="*")
    resp = await hub.get("/healthz", headers={"Origin": "https://anywhere.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers


async def test_anonymous_mode_allows_everything(make_client: ClientFactory, backend: Backend) -> None:
    hub = await make_client(backend, anonymous=True)
    assert (await hub.post("/v1/channels/any/events", json={"data": 1})).status == 201
    await asyncio.sleep(0)


def _reference_match(glob: str, name: str) -> bool:
    # The obvious regex, exact but backtracking: fine on the short inputs below.
    return re.fullmatch(".*".join(re.escape(part) for part in glob.split("*")), name, re.DOTALL) is not None


# Few distinct characters, so that segments overlap and repeat: where a greedy or leftmost choice could go wrong.
_GLOB_CHARS = st.sampled_from(list("ab-*"))


@settings(max_examples=2000, deadline=None)
@given(glob=st.text(_GLOB_CHARS, max_size=10), name=st.text(st.sampled_from(list("ab-")), max_size=14))
def test_glob_matches_whole_names_with_star_as_any_run(glob: str, name: str) -> None:
    assert glob_match(glob, name) == _reference_match(glob, name)


def test_a_pattern_with_many_stars_answers_at_once() -> None:
    # The regex of this pattern tries every way of splitting the name among its stars: 12 s for 100 dashes with six.
    glob, name = "*-" * 12 + "end", "-" * 200
    principal = Principal("jwt", "mallory", subscribe=(glob,))
    started = time.monotonic()
    assert not principal.may("subscribe", name)
    assert principal.may("subscribe", name + "end")
    assert time.monotonic() - started < 1.0  # generous: it takes microseconds; the regex would take years


@pytest.mark.parametrize("content", [b"not a key", b"ed25519"])
def test_a_public_key_file_the_hub_cannot_use_stops_the_start(tmp_path: Path, content: bytes) -> None:
    if content == b"ed25519":
        public = ed25519.Ed25519PrivateKey.generate().public_key()
        content = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(content)
    with pytest.raises(ValueError, match=r"jwt-public-key \(HUB_JWT_PUBLIC_KEY\)"):
        create_node(HubSettings(anonymous=False, jwt_public_key=str(key_file)))
