"""The TLS, token and policy flags `rpcmesh up` and `rpcmesh gateway` share, and the settings they make."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rpcmesh.security.limits import Limits
from rpcmesh.security.settings import SecuritySettings
from rpcmesh.security.tls import ServerTlsConfig


def env_flag(name: str) -> bool:
    """An on/off environment variable (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def add_server_security_arguments(parser: argparse.ArgumentParser, *, with_policy: bool) -> None:
    """Add --tls-*, --token-*, --insecure (and the control plane's --policy), with RPCMESH_* variables."""
    env = os.environ.get
    group = parser.add_argument_group(
        "security", "TLS, mTLS, identities and authorization (`rpcmesh certs` makes development certificates)"
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=env("RPCMESH_TLS_CERT"),
        help="server certificate (env RPCMESH_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key", type=Path, default=env("RPCMESH_TLS_KEY"), help="server key (env RPCMESH_TLS_KEY)"
    )
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=env("RPCMESH_TLS_CA"),
        help="CA that client certificates chain to (env RPCMESH_TLS_CA)",
    )
    group.add_argument(
        "--tls-client-auth",
        action="store_true",
        default=env_flag("RPCMESH_TLS_CLIENT_AUTH"),
        help="require client certificates (mTLS); their name is the identity (env RPCMESH_TLS_CLIENT_AUTH)",
    )
    group.add_argument(
        "--token-secret-file",
        type=Path,
        default=env("RPCMESH_TOKEN_SECRET_FILE"),
        help="HS256 secret of bearer tokens (env RPCMESH_TOKEN_SECRET_FILE)",
    )
    group.add_argument(
        "--token-issuer",
        default=env("RPCMESH_TOKEN_ISSUER") or "rpcmesh",
        help="issuer tokens must name (env RPCMESH_TOKEN_ISSUER)",
    )
    if with_policy:
        group.add_argument(
            "--policy",
            type=Path,
            default=env("RPCMESH_POLICY_FILE"),
            help="YAML policy file (env RPCMESH_POLICY_FILE)",
        )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=env_flag("RPCMESH_INSECURE"),
        help="development mode: accept bearer tokens over plaintext (env RPCMESH_INSECURE)",
    )


def server_security_settings(
    args: argparse.Namespace, *, policy_file: Path | None = None, limits: Limits | None = None
) -> SecuritySettings:
    """SecuritySettings from the parsed flags; ValueError names a bad combination."""
    tls = None
    if args.tls_cert is not None or args.tls_key is not None:
        if args.tls_cert is None or args.tls_key is None:
            raise ValueError("--tls-cert and --tls-key: give both or neither")
        tls = ServerTlsConfig(
            cert_file=args.tls_cert,
            key_file=args.tls_key,
            ca_file=args.tls_ca,
            client_auth=args.tls_client_auth,
        )
    elif args.tls_client_auth:
        raise ValueError("--tls-client-auth: needs --tls-cert and --tls-key")
    return SecuritySettings(
        tls=tls,
        token_secret_file=args.token_secret_file,
        token_issuer=args.token_issuer,
        policy_file=policy_file,
        insecure=args.insecure,
        limits=limits if limits is not None else Limits(),
    )
