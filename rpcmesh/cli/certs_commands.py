"""`rpcmesh certs` (development CA and certificates) and `rpcmesh token` (bearer tokens)."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

from rpcmesh.cli.common import CliError
from rpcmesh.security.certs import write_development_set
from rpcmesh.security.tokens import load_secret, mint_token


def register(commands: Any) -> None:
    """Add the certs and token commands to the CLI."""
    certs = commands.add_parser(
        "certs",
        help="create a development CA and TLS certificates",
        description="Create (or reuse) a development CA in DIR and issue a server certificate for "
        "127.0.0.1, localhost and any --name, plus one client certificate per --client identity "
        "(for mTLS; the certificate's name is the identity). Not for production.",
    )
    certs.add_argument("dir", type=Path, help="folder to write ca.crt, server.crt/.key, client-ID.crt/.key")
    certs.add_argument(
        "--name", action="append", default=[], help="extra server name (DNS or IP) for the SANs; repeatable"
    )
    certs.add_argument(
        "--client",
        action="append",
        default=[],
        help="issue a client certificate for this identity; repeatable",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument(
        "--token-secret", action="store_true", help="also write DIR/token.secret (a random HS256 secret)"
    )
    certs.set_defaults(func=run_certs)

    token = commands.add_parser(
        "token",
        help="mint a bearer token for an identity",
        description="Print a signed bearer token (JWT, HS256) for SUBJECT, valid for --ttl seconds. "
        "Clients send it as 'authorization: Bearer <token>' (env RPCMESH_TOKEN).",
    )
    token.add_argument("subject", help="the identity: a service name or an admin identity")
    token.add_argument(
        "--secret-file",
        type=Path,
        default=os.environ.get("RPCMESH_TOKEN_SECRET_FILE"),
        help="file with the signing secret (env RPCMESH_TOKEN_SECRET_FILE)",
    )
    token.add_argument(
        "--issuer",
        default=os.environ.get("RPCMESH_TOKEN_ISSUER") or "rpcmesh",
        help="issuer (env RPCMESH_TOKEN_ISSUER; default rpcmesh)",
    )
    token.add_argument("--ttl", type=float, default=24 * 3600.0, help="seconds of validity (default 86400)")
    token.set_defaults(func=run_token)


def run_certs(args: argparse.Namespace) -> int:
    """Run `rpcmesh certs`."""
    import datetime

    if args.days < 1:
        raise CliError(f"--days: must be at least 1, got {args.days}")
    try:
        written = write_development_set(
            args.dir,
            server_names=args.name,
            clients=args.client,
            validity=datetime.timedelta(days=args.days),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(f"CA certificate:     {written.ca_cert}")
    print(f"server certificate: {written.server_cert}")
    print(f"server key:         {written.server_key}")
    for identity, (cert, key) in written.clients.items():
        print(f"client {identity}: {cert} {key}")
    if args.token_secret:
        path = args.dir / "token.secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
        print(f"token secret:       {path}")
    return 0


def run_token(args: argparse.Namespace) -> int:
    """Run `rpcmesh token`."""
    if args.secret_file is None:
        raise CliError("--secret-file (or RPCMESH_TOKEN_SECRET_FILE) is required")
    try:
        secret = load_secret(Path(args.secret_file))
        print(mint_token(secret, subject=args.subject, issuer=args.issuer, ttl=args.ttl))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return 0
