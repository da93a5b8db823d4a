"""Authentication and authorization: who is asking (a JWT, a service API key, or nobody in anonymous mode) and
whether they may subscribe to or publish on a channel.

JWT claims: `sub`, `subscribe` and `publish` (lists of channel patterns, `*` matching any run of characters, e.g.
`chat:42`, `user:alice:*`); `exp`, `nbf`, `aud` and `iss` are checked when present or configured. The token comes from
`Authorization: Bearer`, else the `access_token` query parameter, else a cookie (EventSource cannot send headers).
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from aiohttp import web
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ssecore.startup import setting

from .errors import ApiError
from .settings import HubSettings

__all__ = ["Action", "ApiKey", "Authenticator", "Principal", "glob_match", "parse_api_keys", "seconds_left"]

log = logging.getLogger(__name__)

Action = Literal["subscribe", "publish"]

_MIN_API_KEY_LEN = 16
# Clock skew tolerated on exp/nbf between the token issuer and this node.
_LEEWAY_S = 10
_MAX_PATTERNS = 256
_MAX_PATTERN_LEN = 256


@functools.lru_cache(maxsize=4096)
def _segments(glob: str) -> tuple[str, ...]:
    return tuple(glob.split("*"))


def glob_match(glob: str, name: str) -> bool:
    """Whether all of `name` matches `glob`, where `*` stands for any run of characters (empty too).

    Linear in the length of `name`, unlike a regex of `.*`s, which backtracks: `*-*-*-*-*-*-end` took 12 s against a
    name of 100 dashes, and the whole node waited. With `*` the only wildcard, taking each fixed segment at its
    leftmost place after the previous one is always right: a later place only leaves less room for the rest.
    """
    if "*" not in glob:
        return glob == name
    first, *middle, last = _segments(glob)
    end = len(name) - len(last)
    if end < len(first) or not name.startswith(first) or not name.endswith(last):
        return False
    pos = len(first)
    for part in middle:
        found = name.find(part, pos, end)
        if found < 0:
            return False
        pos = found + len(part)
    return True


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller and what it may do."""

    kind: Literal["anonymous", "jwt", "api_key"]
    subject: str
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    expires_at: float | None = None  # epoch seconds (a JWT's exp): streams end then

    def may(self, action: Action, channel: str) -> bool:
        if self.kind == "anonymous":
            return True
        patterns = self.subscribe if action == "subscribe" else self.publish
        return any(glob_match(p, channel) for p in patterns)

    def names(self, action: Action, channel: str) -> bool:
        """The token's list for `action` holds `channel` itself, not only a pattern that matches it (channel names
        cannot hold `*`): such a token reaches a generation's channel whoever owns it."""
        return channel in (self.subscribe if action == "subscribe" else self.publish)


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    key: str
    publish: tuple[str, ...]


def parse_api_keys(text: str, *, source: str) -> list[ApiKey]:
    """`<name> <key> <pattern>[,<pattern>...]` per line (or per `;`); `#` starts a comment."""
    keys: list[ApiKey] = []
    for n, raw in enumerate(re.split(r"[\n;]", text), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{source}: entry {n}: expected `<name> <key> <pattern>[,<pattern>...]`")
        name, key, patterns = parts
        if len(key) < _MIN_API_KEY_LEN:
            raise ValueError(f"{source}: entry {n} ({name}): keys must be at least {_MIN_API_KEY_LEN} characters")
        keys.append(ApiKey(name, key, tuple(p for p in patterns.split(",") if p)))
    return keys


def _read(path: str, name: str) -> str:
    """A file a setting names; one that cannot be read stops the start with a message naming the setting."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ValueError(
            f"cannot read {path} ({why}): set {setting('HUB_', name)} to a file this process can read"
        ) from None


class Authenticator:
    def __init__(self, settings: HubSettings) -> None:
        self.anonymous = settings.anonymous
        self._cookie = settings.auth_cookie
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._jwt_key: Any = None
        self._algorithms: list[str] = []
        if settings.jwt_secret:
            self._jwt_key, self._algorithms = settings.jwt_secret, ["HS256"]
        elif settings.jwt_public_key:
            self._jwt_key, self._algorithms = _public_key(settings.jwt_public_key)
        keys: list[ApiKey] = []
        if settings.api_keys_file:
            keys += parse_api_keys(_read(settings.api_keys_file, "api-keys-file"), source=settings.api_keys_file)
        if settings.api_keys:
            keys += parse_api_keys(settings.api_keys, source="HUB_API_KEYS")
        self._api_keys = keys

    @staticmethod
    def _unauthorized(message: str, *, invalid: bool) -> ApiError:
        challenge = 'Bearer realm="hub"' + (', error="invalid_token"' if invalid else "")
        return ApiError(401, "unauthorized", message, {"WWW-Authenticate": challenge})

    def _token(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise self._unauthorized("the Authorization header must be `Bearer <token>`", invalid=True)
            token = value.strip()
        else:
            token = request.query.get("access_token") or request.cookies.get(self._cookie) or ""
        try:
            # Bytes that are not UTF-8 reach us as lone surrogates (aiohttp decodes headers with surrogateescape);
            # no key or JWT holds them, and comparing or decoding them would raise.
            token.encode()
        except UnicodeEncodeError:
            raise self._unauthorized("the token is not valid text", invalid=True) from None
        return token or None

    def _api_key(self, token: str) -> ApiKey | None:
        found = None
        encoded = token.encode()
        for k in self._api_keys:
            # Every key is compared, in constant time, whatever matched: the timing tells nothing.
            if hmac.compare_digest(encoded, k.key.encode()):
                found = k
        return found

    def authenticate(self, request: web.Request) -> Principal:
        """The caller, or ApiError 401. In anonymous mode, everyone is an anonymous principal that may do anything."""
        if self.anonymous:
            return Principal("anonymous", "anonymous")
        token = self._token(request)
        if token is None:
            raise self._unauthorized("authentication required", invalid=False)
        key = self._api_key(token)
        if key is not None:
            return Principal("api_key", f"key:{key.name}", publish=key.publish)
        if self._jwt_key is None:
            raise self._unauthorized("invalid API key", invalid=True)
        return self._decode(token)

    def _decode(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._jwt_key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=_LEEWAY_S,
                options={"require": ["sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise self._unauthorized("the token has expired", invalid=True) from None
        except jwt.PyJWTError as e:
            # InvalidTokenError, and also what a header naming an algorithm the key cannot do raises (InvalidKeyError).
            log.debug("rejected token: %s", e)
            raise self._unauthorized("invalid token", invalid=True) from None
        sub = claims.get("sub")
        subscribe, publish = claims.get("subscribe", []), claims.get("publish", [])
        if not isinstance(sub, str) or not _patterns_ok(subscribe) or not _patterns_ok(publish):
            raise self._unauthorized("invalid token claims (sub, subscribe, publish)", invalid=True)
        exp = claims.get("exp")
        return Principal("jwt", sub, tuple(subscribe), tuple(publish), float(exp) if exp is not None else None)

    def require(self, request: web.Request, action: Action, channel: str) -> Principal:
        """The caller, if it may `action` on `channel`; else ApiError 401 or 403."""
        principal = self.authenticate(request)
        if not principal.may(action, channel):
            raise ApiError(403, "forbidden", f"this token may not {action} on this channel")
        return principal


# EC curves and the one JWT algorithm that signs with each (RFC 7518 3.4).
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def _public_key(path: str) -> tuple[Any, list[str]]:
    """The key in a PEM file and the one algorithm family it verifies. Asymmetric only: a public key must never be
    accepted as an HMAC secret (algorithm confusion). And only its own family: a token whose header names the other
    one (ES256 against an RSA key) is an invalid token, not a key PyJWT is asked to use for what it cannot do."""
    pem = _read(path, "jwt-public-key").encode()
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"invalid setting {setting('HUB_', 'jwt-public-key')}: {path} is not a PEM public key") from e
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return key, [_EC_ALGORITHMS[key.curve.name]]
    raise ValueError(
        f"invalid setting {setting('HUB_', 'jwt-public-key')}: {path} must hold an RSA or EC (P-256/384/521) public key"
    )


def _patterns_ok(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= _MAX_PATTERNS
        and all(isinstance(p, str) and 0 < len(p) <= _MAX_PATTERN_LEN for p in value)
    )


def seconds_left(principal: Principal) -> float | None:
    """How long a stream opened by this principal may run, or None for no limit."""
    if principal.expires_at is None:
        return None
    return max(0.0, principal.expires_at + _LEEWAY_S - time.time())
