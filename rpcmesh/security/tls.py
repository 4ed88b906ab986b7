"""TLS and mTLS settings, and the grpc credentials built from them.

Servers (the control plane, service hosts) take a :class:`ServerTlsConfig`;
clients take a :class:`ClientTlsConfig`. Both are configured by file paths, in
code or from environment variables (``from_env``). With mTLS the server asks
for a client certificate and verifies it against its CA during the handshake;
the client verifies the server's certificate against its CA and the name it
dialled (or ``server_name``), so a certificate from a foreign CA, an expired
one or one for another host fails the handshake.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "ClientTlsConfig",
    "ServerTlsConfig",
    "channel_credentials",
    "server_credentials",
]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def _optional_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name)
    return Path(value) if value else None


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, kw_only=True)
class ServerTlsConfig:
    """TLS for a server, and optionally mTLS (client certificates required)."""

    cert_file: Path
    """PEM certificate chain of the server."""

    key_file: Path
    """PEM private key of the server."""

    ca_file: Path | None = None
    """PEM CA bundle that client certificates must chain to; required with ``client_auth``."""

    client_auth: bool = False
    """Require and verify a client certificate (mTLS)."""

    def __post_init__(self) -> None:
        if self.client_auth and self.ca_file is None:
            raise ValueError("tls ca_file: required when client certificates are required (mTLS)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerTlsConfig | None:
        """Read RPCMESH_TLS_CERT, RPCMESH_TLS_KEY, RPCMESH_TLS_CA and RPCMESH_TLS_CLIENT_AUTH.

        Returns None when neither certificate nor key is set (plaintext).
        """
        env = os.environ if environ is None else environ
        cert, key = _optional_path(env, "RPCMESH_TLS_CERT"), _optional_path(env, "RPCMESH_TLS_KEY")
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise ValueError("RPCMESH_TLS_CERT and RPCMESH_TLS_KEY: set both or neither")
        return cls(
            cert_file=cert,
            key_file=key,
            ca_file=_optional_path(env, "RPCMESH_TLS_CA"),
            client_auth=_flag(env, "RPCMESH_TLS_CLIENT_AUTH"),
        )


@dataclass(frozen=True, kw_only=True)
class ClientTlsConfig:
    """TLS for a client, and optionally a client certificate for mTLS."""

    ca_file: Path | None = None
    """PEM CA bundle the server certificate must chain to; None uses the system roots."""

    cert_file: Path | None = None
    """PEM client certificate, for mTLS."""

    key_file: Path | None = None
    """PEM client key, for mTLS."""

    server_name: str | None = None
    """Name to verify the server certificate against instead of the dialled host."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls cert_file and key_file: set both or neither")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientTlsConfig | None:
        """Read RPCMESH_TLS_CA, RPCMESH_TLS_CLIENT_CERT, RPCMESH_TLS_CLIENT_KEY, RPCMESH_TLS_SERVER_NAME.

        Returns None when none of them is set (plaintext).
        """
        env = os.environ if environ is None else environ
        ca = _optional_path(env, "RPCMESH_TLS_CA")
        cert = _optional_path(env, "RPCMESH_TLS_CLIENT_CERT")
        key = _optional_path(env, "RPCMESH_TLS_CLIENT_KEY")
        server_name = env.get("RPCMESH_TLS_SERVER_NAME") or None
        if ca is None and cert is None and key is None and server_name is None:
            return None
        return cls(ca_file=ca, cert_file=cert, key_file=key, server_name=server_name)

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options this config needs (the server-name override)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def server_credentials(config: ServerTlsConfig) -> grpc.ServerCredentials:
    """The grpc server credentials for ``config``; files are read now, so errors surface at start."""
    key = _read(config.key_file, "tls key_file")
    cert = _read(config.cert_file, "tls cert_file")
    root = _read(config.ca_file, "tls ca_file") if config.ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=root, require_client_auth=config.client_auth
    )


def channel_credentials(
    config: ClientTlsConfig, call_credentials: grpc.CallCredentials | None = None
) -> grpc.ChannelCredentials:
    """The grpc channel credentials for ``config``, composed with ``call_credentials`` (a token) if given."""
    root = _read(config.ca_file, "tls ca_file") if config.ca_file is not None else None
    key = _read(config.key_file, "tls key_file") if config.key_file is not None else None
    cert = _read(config.cert_file, "tls cert_file") if config.cert_file is not None else None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )
    if call_credentials is not None:
        credentials = grpc.composite_channel_credentials(credentials, call_credentials)
    return credentials
