"""What every CLI command shares: the control-plane target, its TLS/token flags, channels and input parsing.

A failed TLS handshake reaches a command as UNAVAILABLE ("Socket closed"); the channel of
:meth:`Target.channel` turns it into one line, ``TLS handshake failed: <reason>``, naming the cause.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from rpcmesh.security.client import ClientSecurity, TokenSource, sync_channel
from rpcmesh.security.tls import ClientTlsConfig, diagnose_handshake

DEFAULT_TARGET = "127.0.0.1:50051"

M = TypeVar("M", bound=Message)


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=_Page)


def pages(fetch: Callable[[str], P]) -> Iterator[P]:
    """Every page of a paginated List call: ``fetch(page_token)`` gets one, starting from ``""``."""
    token = ""
    while True:
        page = fetch(token)
        yield page
        token = page.next_page_token
        if not token:
            return


Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A usage or input problem, reported as one line with exit code 2."""


class CommandFailed(Exception):
    """The command ran but did not succeed (no responders, ...): one line, exit code 1."""


@dataclass(frozen=True)
class Target:
    """Where the control plane is, how long a call may take, and how to reach it securely."""

    address: str
    timeout: float
    security: ClientSecurity = field(default_factory=ClientSecurity)

    def channel(self) -> grpc.Channel:
        """A channel to the control plane with :attr:`security`.

        Use it as a context manager: an UNAVAILABLE error leaving the ``with`` block whose cause is
        a failed TLS handshake becomes :class:`CommandFailed` ("TLS handshake failed: <reason>").
        """
        try:
            inner = sync_channel(self.address, self.security)
        except ValueError as exc:  # an unreadable CA, certificate or key
            raise CliError(str(exc)) from exc
        return _DiagnosingChannel(inner, self)


class _DiagnosingChannel(grpc.Channel):
    """A grpc channel that names a failed TLS handshake when a call's UNAVAILABLE leaves its block."""

    def __init__(self, inner: grpc.Channel, target: Target) -> None:
        self._inner = inner
        self._target = target

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self._inner.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self._inner.unsubscribe(callback)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.unary_unary(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.unary_stream(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.stream_unary(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._inner.stream_stream(method, *args, **kwargs)

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> _DiagnosingChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        self._inner.close()
        if (
            isinstance(exc, grpc.RpcError)
            and isinstance(exc, grpc.Call)
            and exc.code() is grpc.StatusCode.UNAVAILABLE
        ):
            reason = diagnose_handshake(self._target.address, self._target.security.tls)
            if reason is not None:
                raise CommandFailed(f"TLS handshake failed: {reason}") from exc
        return None


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The --target/--registry and --timeout options every client command takes, and its TLS/token flags."""
    env = os.environ.get
    parser.add_argument(
        "--target",
        "--registry",
        dest="target",
        default=env("RPCMESH_TARGET") or env("RPCMESH_REGISTRY") or DEFAULT_TARGET,
        help="control plane host:port (env RPCMESH_TARGET or RPCMESH_REGISTRY; default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(env("RPCMESH_TIMEOUT", "10")),
        help="seconds a call may take (env RPCMESH_TIMEOUT; default %(default)s)",
    )
    group = parser.add_argument_group("security", "how this client reaches a TLS/mTLS/token control plane")
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=env("RPCMESH_TLS_CA") or None,
        help="dial TLS, trusting this CA (env RPCMESH_TLS_CA)",
    )
    group.add_argument(
        "--tls-client-cert",
        type=Path,
        default=env("RPCMESH_TLS_CLIENT_CERT") or None,
        help="client certificate for mTLS; its name is the identity (env RPCMESH_TLS_CLIENT_CERT)",
    )
    group.add_argument(
        "--tls-client-key",
        type=Path,
        default=env("RPCMESH_TLS_CLIENT_KEY") or None,
        help="key of --tls-client-cert (env RPCMESH_TLS_CLIENT_KEY)",
    )
    group.add_argument(
        "--tls-server-name",
        default=env("RPCMESH_TLS_SERVER_NAME") or None,
        help="name to verify the server certificate against (env RPCMESH_TLS_SERVER_NAME)",
    )
    group.add_argument(
        "--token", default=env("RPCMESH_TOKEN") or None, help="bearer token (env RPCMESH_TOKEN)"
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=env("RPCMESH_TOKEN_FILE") or None,
        help="file holding the bearer token (env RPCMESH_TOKEN_FILE)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=env("RPCMESH_INSECURE", "").strip().lower() in ("1", "true", "yes", "on"),
        help="development mode: send the token over plaintext (env RPCMESH_INSECURE)",
    )


def client_security_of(args: argparse.Namespace) -> ClientSecurity:
    """ClientSecurity from the TLS and token flags; CliError names a bad combination."""
    tls: ClientTlsConfig | None = None
    if args.tls_ca or args.tls_client_cert or args.tls_client_key or args.tls_server_name:
        if (args.tls_client_cert is None) != (args.tls_client_key is None):
            raise CliError("--tls-client-cert and --tls-client-key: give both or neither")
        tls = ClientTlsConfig(
            ca_file=args.tls_ca,
            cert_file=args.tls_client_cert,
            key_file=args.tls_client_key,
            server_name=args.tls_server_name,
        )
    token: TokenSource | None = args.token
    if token is None and args.token_file is not None:
        path: Path = args.token_file

        def read_token() -> str:
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise CliError(f"--token-file: cannot read {path}: {exc.strerror}") from exc

        read_token()  # a missing file is a usage error now, not a failed call later
        token = read_token
    try:
        return ClientSecurity(tls=tls, token=token, insecure=args.insecure)
    except ValueError as exc:
        raise CliError(str(exc).replace("token:", "--token:", 1)) from exc


def target_of(args: argparse.Namespace) -> Target:
    """The Target named by the parsed arguments."""
    return Target(address=args.target, timeout=args.timeout, security=client_security_of(args))


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    """Parse a JSON object given on the command line, or fail with a one-line CliError."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what}: bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(value, dict):
        raise CliError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_message(text: str, message_type: type[M], what: str) -> M:
    """Parse protobuf JSON into message_type, or fail with a one-line CliError."""
    parse_json_object(text, what)
    try:
        return json_format.Parse(text, message_type())
    except json_format.ParseError as exc:
        raise CliError(f"{what}: {exc}") from exc


def parse_headers(pairs: list[str] | None, what: str = "--header") -> dict[str, str]:
    """KEY=VALUE pairs as a dict."""
    headers: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"{what}: expected KEY=VALUE, got {pair!r}")
        headers[key] = value
    return headers


def payload_bytes(data: str | None, data_file: str | None, *, json_expected: bool, what: str) -> bytes:
    """A payload from --data or --data-file ('-' is stdin); JSON payloads are checked."""
    if data is not None and data_file is not None:
        raise CliError(f"{what}: give --data or --data-file, not both")
    if data_file is not None:
        if data_file == "-":
            import sys

            raw = sys.stdin.buffer.read()
        else:
            try:
                with open(data_file, "rb") as handle:
                    raw = handle.read()
            except OSError as exc:
                raise CliError(f"{what}: cannot read {data_file}: {exc.strerror}") from exc
    else:
        raw = (data or "").encode()
    if json_expected and raw:
        try:
            json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CliError(f"{what}: bad JSON: {exc}") from exc
    return raw
