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
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = [
    "ClientTlsConfig",
    "ServerTlsConfig",
    "channel_credentials",
    "diagnose_handshake",
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


MISSING_CLIENT_CERT = "the server requires a client certificate (give --tls-client-cert and --tls-client-key)"
PLAINTEXT_CLIENT = "the server speaks TLS but this client dials plaintext (give --tls-ca, env RPCMESH_TLS_CA)"


def _split_address(target: str) -> tuple[str, int] | None:
    """Host and port of a ``host:port`` (or ``[v6]:port``) target; None for other target forms."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host:
        return None
    return host.strip("[]"), int(port)


def _validity_note(cert_file: Path) -> str:
    """A note for the message: when the certificate is outside its validity period, else a hint."""
    import datetime

    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return ""
    now = datetime.datetime.now(datetime.UTC)
    if certificate.not_valid_after_utc < now:
        return f": it expired at {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if certificate.not_valid_before_utc > now:
        return f": it is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return " (is it issued by the server's CA?)"


def _alert(exc: ssl.SSLError) -> str:
    """A readable reason from an OpenSSL error ("tlsv13 alert certificate required", ...)."""
    reason = exc.reason or ""
    return reason.lower().replace("_", " ") or str(exc)


def diagnose_handshake(target: str, config: ClientTlsConfig | None, *, timeout: float = 3.0) -> str | None:
    """Why a TLS handshake with ``target`` fails for a client configured with ``config``, or None.

    grpc reports a failed handshake as UNAVAILABLE ("Socket closed", "failed to connect"); this
    repeats the handshake once with the standard ``ssl`` module to name the cause: a plaintext
    client (``config`` None) dialling a TLS server, a TLS client dialling a plaintext server, an
    unknown CA, an expired or mismatched certificate, or a client certificate the server wants
    (missing) or refuses. None when the handshake succeeds or the server cannot be reached.
    """
    address = _split_address(target)
    if address is None:
        return None
    host, port = address
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    if config is None:
        # Only asks whether the server speaks TLS at all.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            if config.ca_file is not None:
                context.load_verify_locations(cafile=str(config.ca_file))
            else:
                context.load_default_certs()
            if config.cert_file is not None and config.key_file is not None:
                context.load_cert_chain(str(config.cert_file), str(config.key_file))
        except (OSError, ssl.SSLError) as exc:
            return f"cannot load the client's TLS files: {exc}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    with raw:
        try:
            with context.wrap_socket(
                raw, server_hostname=(config.server_name if config else None) or host
            ) as tls:
                if config is None:
                    return PLAINTEXT_CLIENT
                # TLS 1.3 servers judge the client certificate after the client's handshake is done:
                # their verdict arrives as an alert on the first read.
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                if tls.recv(1):
                    return None
                # Closed without an alert right after the handshake: the server refused the client.
                if config.cert_file is None:
                    return MISSING_CLIENT_CERT
                return "the server refused this client's certificate" + _validity_note(config.cert_file)
        except ssl.SSLCertVerificationError as exc:
            message = exc.verify_message or _alert(exc)
            if exc.verify_code in (19, 20, 21):  # self-signed in chain, unknown issuer, unverifiable leaf
                return f"unknown CA: the server's certificate does not chain to the trusted CA ({message})"
            return f"the server's certificate was refused: {message}"
        except ssl.SSLError as exc:
            reason = _alert(exc)
            not_tls = any(
                sign in reason for sign in ("wrong version", "record layer", "packet length", "eof")
            )
            if config is None:
                return None if not_tls else PLAINTEXT_CLIENT
            if not_tls:
                return "the server does not speak TLS (a plaintext server?): drop --tls-ca or check the port"
            if "certificate required" in reason or (
                "handshake failure" in reason and config.cert_file is None
            ):
                return (
                    "the server requires a client certificate (give --tls-client-cert and --tls-client-key)"
                )
            if "alert" in reason:
                return f"the server refused this client's certificate ({reason})"
            return reason
        except OSError:
            return None
    return None
