"""Client side: TLS channel credentials and the bearer token, for asyncio and sync channels.

:class:`ClientSecurity` says how a client reaches a server: TLS settings
(:class:`~rpcmesh.security.tls.ClientTlsConfig`, with a client certificate for
mTLS) and a bearer token. Over TLS the token travels as gRPC call credentials;
over plaintext a client refuses to send it unless development mode
(``insecure``) is explicit, and then adds it with a small interceptor because
grpc itself never sends call credentials over plaintext.

Usage::

    security = ClientSecurity.from_env()          # or ClientSecurity(tls=..., token=...)
    channel = aio_channel("127.0.0.1:50051", security)
    stub = registry_pb2_grpc.RegistryStub(channel)
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from rpcmesh.security.identity import AUTHORIZATION_KEY
from rpcmesh.security.tls import ClientTlsConfig, channel_credentials

__all__ = ["ClientSecurity", "TokenSource", "aio_channel", "sync_channel", "token_call_credentials"]

TokenSource = str | Callable[[], str]
"""A token, or a function returning the current one (to refresh before expiry)."""


def _current(token: TokenSource) -> str:
    return token() if callable(token) else token


class _TokenPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, token: TokenSource) -> None:
        self._token = token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            value = _current(self._token)
        except Exception as exc:
            callback((), exc)
            return
        callback(((AUTHORIZATION_KEY, f"Bearer {value}"),), None)


def token_call_credentials(token: TokenSource) -> grpc.CallCredentials:
    """Call credentials sending ``authorization: Bearer <token>`` (grpc sends them only over TLS)."""
    return grpc.metadata_call_credentials(_TokenPlugin(token), name="rpcmesh-bearer")


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, kw_only=True)
class ClientSecurity:
    """How a client authenticates the server and itself."""

    tls: ClientTlsConfig | None = None
    """TLS settings; None dials plaintext."""

    token: TokenSource | None = None
    """Bearer token (or a function returning it) identifying this client."""

    insecure: bool = False
    """Explicit development mode: allow sending the token over plaintext."""

    def __post_init__(self) -> None:
        if self.token is not None and self.tls is None and not self.insecure:
            raise ValueError(
                "token: refusing to send a bearer token over a plaintext channel; configure TLS "
                "or set insecure (development mode) explicitly"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        """Read RPCMESH_TLS_CA/_CLIENT_CERT/_CLIENT_KEY/_SERVER_NAME, RPCMESH_TOKEN or
        RPCMESH_TOKEN_FILE, and RPCMESH_INSECURE."""  # noqa: D205, D209
        env = os.environ if environ is None else environ
        token: TokenSource | None = env.get("RPCMESH_TOKEN") or None
        token_file = env.get("RPCMESH_TOKEN_FILE")
        if token is None and token_file:
            path = Path(token_file)

            def read_token() -> str:
                return path.read_text(encoding="utf-8").strip()

            token = read_token
        return cls(tls=ClientTlsConfig.from_env(env), token=token, insecure=_flag(env, "RPCMESH_INSECURE"))

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials (TLS plus the token), or None for plaintext."""
        if self.tls is None:
            return None
        call = token_call_credentials(self.token) if self.token is not None else None
        return channel_credentials(self.tls, call)

    def options(self) -> list[tuple[str, Any]]:
        """Channel options the settings need (TLS server-name override)."""
        return self.tls.channel_options() if self.tls is not None else []

    def aio_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Interceptors adding the token over plaintext in development mode; empty otherwise."""
        if self.tls is not None or self.token is None:
            return []
        token = self.token
        return [
            _AioUnaryUnary(token),
            _AioUnaryStream(token),
            _AioStreamUnary(token),
            _AioStreamStream(token),
        ]

    def metadata(self) -> list[tuple[str, str]]:
        """The token as metadata, for callers that add metadata themselves."""
        return [] if self.token is None else [(AUTHORIZATION_KEY, f"Bearer {_current(self.token)}")]


def aio_channel(
    target: str,
    security: ClientSecurity | None = None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` with ``security`` (plaintext without token when None).

    ``interceptors`` run outside the token interceptor (development mode), in order.
    """
    security = security or ClientSecurity()
    all_options = [*options, *security.options()]
    credentials = security.credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(
            target, credentials, options=all_options, interceptors=list(interceptors) or None
        )
    chain = [*interceptors, *security.aio_interceptors()]
    return grpc.aio.insecure_channel(target, options=all_options, interceptors=chain or None)


def sync_channel(
    target: str, security: ClientSecurity | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking grpc channel to ``target`` with ``security``."""
    security = security or ClientSecurity()
    all_options = [*options, *security.options()]
    credentials = security.credentials()
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=all_options)
    channel = grpc.insecure_channel(target, options=all_options)
    if security.token is not None:
        channel = grpc.intercept_channel(channel, _SyncTokenInterceptor(security.token))
    return channel


def _with_token(metadata: Any, token: TokenSource) -> list[tuple[str, Any]]:
    items = [(key, value) for key, value in (metadata or ()) if key != AUTHORIZATION_KEY]
    return [*items, (AUTHORIZATION_KEY, f"Bearer {_current(token)}")]


class _AioTokenBase:
    def __init__(self, token: TokenSource) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=grpc.aio.Metadata(*_with_token(details.metadata, self._token)),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


class _AioUnaryUnary(_AioTokenBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioTokenBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioTokenBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioTokenBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _SyncCallDetails(
    collections.namedtuple(
        "_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: TokenSource) -> None:
        self._token = token

    def _details(self, details: Any) -> _SyncCallDetails:
        return _SyncCallDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, self._token),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)
