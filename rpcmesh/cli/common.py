"""What every CLI command shares: the control-plane target, channels and input parsing."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from rpcmesh.security.client import ClientSecurity, sync_channel

DEFAULT_TARGET = "127.0.0.1:50051"

M = TypeVar("M", bound=Message)
Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A usage or input problem, reported as one line with exit code 2."""


class CommandFailed(Exception):
    """The command ran but did not succeed (no responders, ...): one line, exit code 1."""


@dataclass(frozen=True)
class Target:
    """Where the control plane is, and how long a call may take."""

    address: str
    timeout: float

    def channel(self) -> grpc.Channel:
        """A channel to the control plane: TLS, client certificate and token from the environment.

        ``RPCMESH_TLS_CA``/``_CLIENT_CERT``/``_CLIENT_KEY``/``_SERVER_NAME``, ``RPCMESH_TOKEN``
        (or ``RPCMESH_TOKEN_FILE``) and ``RPCMESH_INSECURE``; plaintext when none is set.
        """
        try:
            security = ClientSecurity.from_env()
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        return sync_channel(self.address, security)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The --target/--registry and --timeout options every client command takes."""
    parser.add_argument(
        "--target",
        "--registry",
        dest="target",
        default=os.environ.get("RPCMESH_TARGET") or os.environ.get("RPCMESH_REGISTRY") or DEFAULT_TARGET,
        help="control plane host:port (env RPCMESH_TARGET or RPCMESH_REGISTRY; default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("RPCMESH_TIMEOUT", "10")),
        help="seconds a call may take (env RPCMESH_TIMEOUT; default %(default)s)",
    )


def target_of(args: argparse.Namespace) -> Target:
    """The Target named by the parsed arguments."""
    return Target(address=args.target, timeout=args.timeout)


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
