"""Signed identity tokens: compact JWTs with HS256, made and checked with the standard library.

A token says who the caller is (``sub``: a service identity or an admin), who
issued it (``iss``) and until when it holds (``exp``). The control plane and
whoever mints tokens (``rpcmesh token``) share a secret. The format is a
standard JWT (RFC 7519) so other languages can mint and read it with any JWT
library, but only ``alg: HS256`` is accepted: the algorithm in the header is
never trusted to pick the check, which rules out ``alg: none`` and key
confusion. No dependency is needed: HMAC-SHA256 and base64url are in the
standard library, and verification compares signatures in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MIN_SECRET_BYTES",
    "TokenClaims",
    "TokenError",
    "load_secret",
    "mint_token",
    "verify_token",
]

MIN_SECRET_BYTES = 32
"""Shortest accepted signing secret: HS256 wants at least 256 bits."""

MAX_TOKEN_CHARS = 4096
"""Longer tokens are refused before any decoding."""

CLOCK_SKEW_SECONDS = 30.0
"""Tolerated clock difference between the minting and the verifying host."""

_HEADER = {"alg": "HS256", "typ": "JWT"}


class TokenError(ValueError):
    """A token is malformed, badly signed, expired or from another issuer."""


@dataclass(frozen=True, kw_only=True)
class TokenClaims:
    """What a verified token says."""

    subject: str
    """The identity: a service name, or an admin identity."""

    issuer: str
    """Who minted it."""

    expires_at: float
    """Expiry, seconds since the epoch."""

    issued_at: float
    """Issue time, seconds since the epoch."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("token is not base64url") from exc


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"token secret: must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")


def _sign(secret: bytes, signing_input: str) -> bytes:
    return hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()


def mint_token(secret: bytes, *, subject: str, issuer: str, ttl: float, now: float | None = None) -> str:
    """A signed token for ``subject`` that expires ``ttl`` seconds from ``now``."""
    _check_secret(secret)
    if not subject:
        raise ValueError("subject: must not be empty")
    if ttl <= 0:
        raise ValueError(f"ttl: must be > 0 seconds, got {ttl}")
    issued = time.time() if now is None else now
    payload = {"sub": subject, "iss": issuer, "iat": int(issued), "exp": int(issued + ttl)}
    signing_input = ".".join(
        _b64encode(json.dumps(part, separators=(",", ":"), sort_keys=True).encode())
        for part in (_HEADER, payload)
    )
    return f"{signing_input}.{_b64encode(_sign(secret, signing_input))}"


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(text))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenError(f"token {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise TokenError(f"token {what} is not a JSON object")
    return value


def verify_token(secret: bytes, token: str, *, issuer: str, now: float | None = None) -> TokenClaims:
    """Check the signature, issuer and expiry of ``token``; returns its claims or raises TokenError."""
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("token is too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("token is not a JWT (header.payload.signature)")
    header_text, payload_text, signature_text = parts
    if not hmac.compare_digest(_sign(secret, f"{header_text}.{payload_text}"), _b64decode(signature_text)):
        raise TokenError("token signature is invalid")
    header = _json_object(header_text, "header")
    if header.get("alg") != "HS256":
        raise TokenError("token algorithm must be HS256")
    payload = _json_object(payload_text, "payload")
    subject, token_issuer = payload.get("sub"), payload.get("iss")
    expires, issued = payload.get("exp"), payload.get("iat", 0)
    if not isinstance(subject, str) or not subject:
        raise TokenError("token has no subject")
    if token_issuer != issuer:
        raise TokenError("token is from another issuer")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise TokenError("token has no expiry")
    if not isinstance(issued, int | float) or isinstance(issued, bool):
        raise TokenError("token issue time is not a number")
    current = time.time() if now is None else now
    if current > expires + CLOCK_SKEW_SECONDS:
        raise TokenError("token has expired")
    if issued > current + CLOCK_SKEW_SECONDS:
        raise TokenError("token is not valid yet")
    return TokenClaims(subject=subject, issuer=issuer, expires_at=float(expires), issued_at=float(issued))


def load_secret(path: Path) -> bytes:
    """Read a signing secret from a file (surrounding whitespace stripped) and check its length."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"token secret file: cannot read {path}: {exc.strerror}") from exc
    _check_secret(secret)
    return secret
