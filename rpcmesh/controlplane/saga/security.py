"""The coordinator's client security: how `rpcmesh up` reaches its own Registry and the participants.

The coordinator is a client of the control plane it runs in (a Registry watch per
participant service, ListServices at start) and of every participant. It never takes
the Mesh default (``ClientSecurity.from_env()``): the ``RPCMESH_TLS_CLIENT_*`` and
``RPCMESH_TOKEN`` variables belong to the CLI and the services, not to `rpcmesh up`.

:func:`coordinator_client_security` decides, purely from the control plane's
configuration (``config.security`` and ``config.coordinator``) and the environment:

* Secure modes (the control plane authenticates its callers):

  - TLS trusting ``--tls-ca``; without it the coordinator could not verify its own
    server, so a missing CA is an error naming ``--tls-ca``.
  - mTLS (``--tls-client-auth``): the client certificate ``--coordinator-cert``/``--coordinator-key``
    is required (an error names them when missing); a token is added when one is available.
  - Tokens (``--token-secret-file``): ``--coordinator-token-file`` when given; otherwise the
    control plane mints its coordinator a token naming ``--coordinator-identity``
    (default ``rpcmesh-coordinator``) with its own secret, renewed before it expires.

* Without authentication (development): the client TLS variables (``RPCMESH_TLS_CA``, ...)
  when set, else TLS trusting ``tls.ca_file`` when the control plane serves TLS; a token from
  ``RPCMESH_TOKEN``/``RPCMESH_TOKEN_FILE`` is sent over plaintext only in explicit development
  mode (``insecure``), otherwise left out with a warning, never raised.

Errors are ``ValueError`` with one line naming the missing flag and its environment variable;
`rpcmesh up` prints it and exits 1 before serving.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.security.client import ClientSecurity, TokenSource
from rpcmesh.security.tls import ClientTlsConfig
from rpcmesh.security.tokens import load_secret, mint_token

__all__ = ["CoordinatorSecurity", "coordinator_client_security"]

TOKEN_OVER_PLAINTEXT_WARNING = (
    "WARNING: the saga coordinator does not send RPCMESH_TOKEN over plaintext; its calls to the "
    "Registry and to participants go without a token. Configure TLS, or set RPCMESH_INSECURE "
    "(development mode) to send it anyway."
)
MISSING_CERT = (
    "--tls-client-auth: the saga coordinator needs a client certificate: give --coordinator-cert and "
    "--coordinator-key (env RPCMESH_COORDINATOR_CERT/RPCMESH_COORDINATOR_KEY; "
    "`rpcmesh certs DIR --client rpcmesh-coordinator` makes them)"
)
MISSING_CA = (
    "--tls-ca: the saga coordinator needs the CA of this server's certificate to call it "
    "(env RPCMESH_TLS_CA; `rpcmesh certs` writes DIR/ca.crt)"
)
MINTED_TOKEN_TTL = 3600.0
"""Lifetime of a token the control plane mints for its coordinator; renewed at half of it."""


@dataclass(frozen=True, kw_only=True)
class CoordinatorSecurity:
    """The decided client security and what to tell the operator.

    Attributes:
        security: What the coordinator's mesh and Registry channel use.
        warnings: Lines to log at start (empty when nothing was left out).
    """

    security: ClientSecurity
    warnings: tuple[str, ...] = ()


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _file_token(path: Path) -> TokenSource:
    def read_token() -> str:
        return path.read_text(encoding="utf-8").strip()

    return read_token


def _env_token(env: Mapping[str, str]) -> TokenSource | None:
    token = env.get("RPCMESH_TOKEN") or None
    if token is not None:
        return token
    token_file = env.get("RPCMESH_TOKEN_FILE")
    return _file_token(Path(token_file)) if token_file else None


class _MintedToken:
    """A token the control plane signs for its own coordinator, re-minted at half its lifetime."""

    def __init__(self, secret: bytes, *, subject: str, issuer: str, ttl: float = MINTED_TOKEN_TTL) -> None:
        self._secret, self._subject, self._issuer, self._ttl = secret, subject, issuer, ttl
        self._lock = threading.Lock()  # grpc calls token plugins from its own threads
        self._token = ""
        self._renew_at = 0.0

    def __call__(self) -> str:
        with self._lock:
            now = time.time()
            if now >= self._renew_at:
                self._token = mint_token(
                    self._secret, subject=self._subject, issuer=self._issuer, ttl=self._ttl
                )
                self._renew_at = now + self._ttl / 2
            return self._token


def _secure(config: ControlPlaneConfig) -> ClientSecurity:
    settings, identity = config.security, config.coordinator
    token: TokenSource | None = None
    if identity.token_file is not None:
        if settings.token_secret_file is None:
            raise ValueError("--coordinator-token-file: needs --token-secret-file (token mode)")
        token = _file_token(identity.token_file)
    elif settings.token_secret_file is not None and identity.cert_file is None:
        token = _MintedToken(
            load_secret(settings.token_secret_file), subject=identity.name, issuer=settings.token_issuer
        )
    tls: ClientTlsConfig | None = None
    if settings.tls is not None:
        if settings.tls.client_auth and identity.cert_file is None:
            raise ValueError(MISSING_CERT)
        if settings.tls.ca_file is None:
            raise ValueError(MISSING_CA)
        tls = ClientTlsConfig(
            ca_file=settings.tls.ca_file, cert_file=identity.cert_file, key_file=identity.key_file
        )
    return ClientSecurity(tls=tls, token=token, insecure=settings.insecure)


def coordinator_client_security(
    config: ControlPlaneConfig, environ: Mapping[str, str] | None = None
) -> CoordinatorSecurity:
    """The control plane's own client security (see the module docstring).

    Raises:
        ValueError: A secure mode lacks what the coordinator needs (one line naming the flag).
    """
    if config.security.authentication_enabled:
        return CoordinatorSecurity(security=_secure(config))
    env = os.environ if environ is None else environ
    tls = ClientTlsConfig.from_env(env)
    if tls is None and config.security.tls is not None:
        tls = ClientTlsConfig(ca_file=config.security.tls.ca_file)
    insecure = config.security.insecure or _flag(env, "RPCMESH_INSECURE")
    token = _env_token(env)
    warnings: tuple[str, ...] = ()
    if token is not None and tls is None and not insecure:
        token, warnings = None, (TOKEN_OVER_PLAINTEXT_WARNING,)
    return CoordinatorSecurity(
        security=ClientSecurity(tls=tls, token=token, insecure=insecure), warnings=warnings
    )
