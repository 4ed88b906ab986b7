"""Tokens (HS256 JWT) and the authenticator that turns metadata or a certificate into an identity."""

from __future__ import annotations

import base64
import json

import pytest

from rpcmesh.security.identity import AuthenticationError, Authenticator
from rpcmesh.security.tokens import TokenError, mint_token, verify_token

SECRET = b"s" * 32
NOW = 1_800_000_000.0


def test_round_trip() -> None:
    token = mint_token(SECRET, subject="order-service", issuer="rpcmesh", ttl=60, now=NOW)
    claims = verify_token(SECRET, token, issuer="rpcmesh", now=NOW + 10)
    assert claims.subject == "order-service"
    assert claims.expires_at == NOW + 60


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t + "x", "signature"),
        (lambda t: "a.b", "not a JWT"),
        (lambda t: t.split(".")[0] + "." + t.split(".")[1] + ".", "signature"),
    ],
)
def test_tampered_tokens_fail(mutate, message) -> None:
    token = mint_token(SECRET, subject="a", issuer="rpcmesh", ttl=60, now=NOW)
    with pytest.raises(TokenError, match=message):
        verify_token(SECRET, mutate(token), issuer="rpcmesh", now=NOW)


def test_expired_wrong_issuer_wrong_secret() -> None:
    token = mint_token(SECRET, subject="a", issuer="rpcmesh", ttl=60, now=NOW)
    with pytest.raises(TokenError, match="expired"):
        verify_token(SECRET, token, issuer="rpcmesh", now=NOW + 60 + 31)
    with pytest.raises(TokenError, match="issuer"):
        verify_token(SECRET, token, issuer="other", now=NOW)
    with pytest.raises(TokenError, match="signature"):
        verify_token(b"t" * 32, token, issuer="rpcmesh", now=NOW)


def test_alg_none_is_refused_even_with_valid_hmac() -> None:
    import hashlib
    import hmac

    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    signing_input = b64({"alg": "none"}) + "." + b64({"sub": "a", "iss": "rpcmesh", "exp": NOW + 60})
    signature = hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="HS256"):
        verify_token(SECRET, token, issuer="rpcmesh", now=NOW)


def test_short_secret_and_bad_arguments_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        mint_token(b"short", subject="a", issuer="i", ttl=1)
    with pytest.raises(ValueError, match="subject"):
        mint_token(SECRET, subject="", issuer="i", ttl=1)
    with pytest.raises(ValueError, match="ttl"):
        mint_token(SECRET, subject="a", issuer="i", ttl=0)


def _auth(**kwargs) -> Authenticator:
    return Authenticator(token_secret=SECRET, clock=lambda: NOW, **kwargs)


def test_authenticator_token_and_certificate() -> None:
    token = mint_token(SECRET, subject="svc", issuer="rpcmesh", ttl=60, now=NOW)
    identity = _auth().authenticate([("authorization", f"Bearer {token}")], {})
    assert (identity.name, identity.source) == ("svc", "token")
    cert_only = Authenticator(accept_certificates=True)
    identity = cert_only.authenticate([], {"x509_common_name": [b"billing"]})
    assert (identity.name, identity.source) == ("billing", "certificate")


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Basic abc")],
        [("authorization", "Bearer nonsense")],
        [("authorization", "Bearer a.b.c"), ("authorization", "Bearer a.b.c")],
    ],
)
def test_authenticator_refuses(metadata) -> None:
    with pytest.raises(AuthenticationError):
        _auth(accept_certificates=True).authenticate(metadata, {})


def test_bad_token_is_not_replaced_by_certificate() -> None:
    with pytest.raises(AuthenticationError, match="invalid token"):
        _auth(accept_certificates=True).authenticate(
            [("authorization", "Bearer x.y.z")], {"x509_common_name": [b"svc"]}
        )


def test_token_to_server_without_secret_is_refused() -> None:
    with pytest.raises(AuthenticationError, match="does not accept"):
        Authenticator(accept_certificates=True).authenticate([("authorization", "Bearer x")], {})
