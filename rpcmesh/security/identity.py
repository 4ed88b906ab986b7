"""Who is calling: a bearer token in the metadata, or the verified mTLS client certificate (pure).

:class:`Authenticator` turns what grpc gives a handler — the invocation metadata
and the auth context — into an :class:`Identity`, or raises
:class:`AuthenticationError` (UNAUTHENTICATED). A bearer token, when present,
must be valid: a bad token is never silently replaced by the certificate. Without
a token, the certificate's common name is the identity (grpc has already checked
it against the CA during the handshake).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rpcmesh.security.tokens import TokenError, verify_token

__all__ = ["AUTHORIZATION_KEY", "AuthenticationError", "Authenticator", "Identity"]

AUTHORIZATION_KEY = "authorization"
"""Metadata key of the bearer token (lower case, as gRPC requires)."""

_BEARER = "bearer "


class AuthenticationError(Exception):
    """Missing or invalid credentials."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    name: str
    """The service identity (or admin identity)."""

    source: str
    """``"token"`` or ``"certificate"``."""


@dataclass(frozen=True, kw_only=True)
class Authenticator:
    """How a server recognises callers."""

    token_secret: bytes | None = None
    """HS256 secret of bearer tokens; None accepts no tokens."""

    token_issuer: str = "rpcmesh"
    """The ``iss`` tokens must carry."""

    accept_certificates: bool = False
    """Take a verified client certificate's common name as the identity."""

    clock: Callable[[], float] = time.time
    """Wall clock for token expiry (tests replace it)."""

    @property
    def enabled(self) -> bool:
        """Whether callers must authenticate at all."""
        return self.token_secret is not None or self.accept_certificates

    def authenticate(
        self, metadata: Iterable[tuple[str, Any]], auth_context: Mapping[str, Iterable[bytes]]
    ) -> Identity:
        """The caller's identity; raises AuthenticationError when there is none or it is invalid."""
        tokens = [value for key, value in metadata if key == AUTHORIZATION_KEY]
        if len(tokens) > 1:
            raise AuthenticationError("more than one authorization header")
        if tokens:
            return self._from_token(tokens[0])
        if self.accept_certificates:
            names = list(auth_context.get("x509_common_name") or ())
            if names:
                name = names[0].decode("utf-8", "replace")
                if name:
                    return Identity(name, "certificate")
        raise AuthenticationError(
            "missing credentials: send 'authorization: Bearer <token>' metadata"
            + (" or a client certificate" if self.accept_certificates else "")
        )

    def _from_token(self, value: Any) -> Identity:
        if self.token_secret is None:
            raise AuthenticationError("this server does not accept bearer tokens")
        if not isinstance(value, str) or not value[: len(_BEARER)].lower() == _BEARER:
            raise AuthenticationError("authorization metadata must be 'Bearer <token>'")
        try:
            claims = verify_token(
                self.token_secret, value[len(_BEARER) :].strip(), issuer=self.token_issuer, now=self.clock()
            )
        except TokenError as exc:
            raise AuthenticationError(f"invalid token: {exc}") from exc
        return Identity(claims.subject, "token")
