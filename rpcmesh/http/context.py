"""A ``grpc.aio.ServicerContext`` stand-in for calls that arrive over HTTP (the Connect protocol).

The control plane's handlers, wrapped by the security guard, tracing and the stream tracker,
read their caller from the context: ``invocation_metadata()`` (the bearer token, trace
context, correlation id), ``auth_context()`` (the mTLS client certificate's common name),
``peer()`` (the per-connection limit), ``time_remaining()``; and end a call with ``abort`` or
``abort_with_status``. :class:`HttpServicerContext` gives them the same from the HTTP request
(headers become metadata as gRPC would see them), and turns an abort into a
:class:`connectrpc.errors.ConnectError` with the same code, message and ``google.rpc``
details (:meth:`HttpServicerContext.connect_error`), which connectrpc writes as the
protocol's error JSON.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import grpc
import grpc.aio
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from google.rpc import status_pb2
from protobuf.wkt import Any as WireAny

__all__ = ["HttpServicerContext", "connect_code", "metadata_from_headers"]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailing metadata key of the serialized ``google.rpc.Status`` (as grpc-status does it)."""

_NOT_METADATA = frozenset(
    {
        "host",
        "content-type",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "te",
        "cookie",
    }
)
"""HTTP headers that are transport, not call metadata (gRPC never shows them to a handler either)."""

_NOT_METADATA_PREFIXES = ("connect-", "grpc-", ":")


def connect_code(code: grpc.StatusCode) -> Code:
    """The Connect code of a gRPC status code (same names; CANCELLED is spelled ``canceled``)."""
    if code is grpc.StatusCode.CANCELLED:
        return Code.CANCELED
    try:
        return Code[code.name]
    except KeyError:
        return Code.UNKNOWN


def metadata_from_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str | bytes], ...]:
    """The call metadata a gRPC handler would see for these HTTP request headers.

    Keys are lower case; transport headers are left out; ``-bin`` values are base64 (as the
    Connect and gRPC protocols send them) and become bytes.
    """
    metadata: list[tuple[str, str | bytes]] = []
    for raw_key, value in headers:
        key = raw_key.lower()
        if key in _NOT_METADATA or key.startswith(_NOT_METADATA_PREFIXES):
            continue
        if key.endswith("-bin"):
            try:
                metadata.append((key, base64.b64decode(value + "=" * (-len(value) % 4))))
            except (binascii.Error, ValueError):
                continue
        else:
            metadata.append((key, value))
    return tuple(metadata)


def _peer(client_address: str | None) -> str:
    """``ipv4:HOST:PORT`` / ``ipv6:[HOST]:PORT`` as grpc names a peer (one TCP connection)."""
    if not client_address:
        return "unknown"
    host, _, port = client_address.rpartition(":")
    if ":" in host:
        return f"ipv6:[{host.strip('[]')}]:{port}"
    return f"ipv4:{client_address}"


class HttpServicerContext:
    """The servicer context of one HTTP call (the methods rpcmesh's handlers and wrappers use).

    Args:
        method: Full method name, ``/rpcmesh.v1.Registry/Resolve``.
        headers: The request headers (name, value) pairs.
        client_address: ``host:port`` of the TCP peer.
        common_name: The verified client certificate's common name (mTLS), else None.
        time_remaining: Seconds left of the call's deadline, or None (no deadline).
    """

    def __init__(
        self,
        *,
        method: str,
        headers: Iterable[tuple[str, str]],
        client_address: str | None,
        common_name: str | None,
        time_remaining: Callable[[], float | None],
    ) -> None:
        self.method = method
        self._metadata = metadata_from_headers(headers)
        self._peer = _peer(client_address)
        self._common_name = common_name
        self._time_remaining = time_remaining
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self._done = False
        self._callbacks: list[Callable[[Any], None]] = []

    # -- what the caller sent -------------------------------------------------------

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The request headers as gRPC metadata."""
        return self._metadata

    def peer(self) -> str:
        """The TCP peer, as grpc formats it."""
        return self._peer

    def peer_identities(self) -> list[bytes] | None:
        """The client certificate's common name (mTLS), else None."""
        return [self._common_name.encode()] if self._common_name else None

    def peer_identity_key(self) -> str | None:
        """``x509_common_name`` with mTLS, else None."""
        return "x509_common_name" if self._common_name else None

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        """``x509_common_name`` of the verified client certificate (mTLS), as grpc gives it."""
        if not self._common_name:
            return {}
        return {
            "x509_common_name": [self._common_name.encode()],
            "transport_security_type": [b"ssl"],
        }

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (``connect-timeout-ms``), None without one."""
        return self._time_remaining()

    # -- ending the call ------------------------------------------------------------

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> NoReturn:
        """End the call with ``code``; raises ``grpc.aio.AbortError`` as grpc does."""
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        """End the call with a status carrying ``google.rpc`` details in its trailing metadata."""
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        """Set the status code the call ends with."""
        self._code = code

    def set_details(self, details: str) -> None:
        """Set the status message the call ends with."""
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        """The code set by abort or set_code (None: OK so far)."""
        return self._code

    def details(self) -> str | None:
        """The message set by abort or set_details."""
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Trailing metadata: text values become response trailers (Connect ``trailer-`` headers)."""
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailing metadata set so far."""
        return self._trailing

    async def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, str]]) -> None:
        """Accepted and ignored: HTTP responses carry no separate initial metadata here."""

    def cancelled(self) -> bool:
        """Whether the call was cancelled (ended early); connectrpc cancels the handler instead."""
        return False

    def done(self) -> bool:
        """Whether the call has ended."""
        return self._done

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Run ``callback(self)`` when the call ends."""
        self._callbacks.append(callback)

    def disable_next_message_compression(self) -> None:
        """Accepted and ignored."""

    def set_compression(self, compression: grpc.Compression) -> None:
        """Accepted and ignored (connectrpc negotiates compression)."""

    def finish(self) -> None:
        """Mark the call ended and run the done callbacks."""
        if self._done:
            return
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def connect_error(self) -> ConnectError:
        """The aborted status as a ConnectError: same code, message and ``google.rpc`` details."""
        code = self._code or grpc.StatusCode.UNKNOWN
        details: list[ErrorDetail] = []
        for key, value in self._trailing:
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
                details.extend(
                    ErrorDetail(WireAny(type_url=item.type_url, value=item.value)) for item in status.details
                )
        return ConnectError(connect_code(code), self._details or "", details)

    def response_trailers(self) -> list[tuple[str, str]]:
        """Text trailing metadata to send back (binary values and the status details are left out)."""
        return [
            (key, value)
            for key, value in self._trailing
            if isinstance(value, str) and not key.startswith("grpc-")
        ]
