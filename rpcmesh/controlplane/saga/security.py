"""The coordinator's client security: how `rpcmesh up` reaches its own Registry and the participants.

The coordinator is a client of the control plane it runs in (a Registry watch per
participant service) and of every participant. It never takes the Mesh default
(``ClientSecurity.from_env()``), which raises when ``RPCMESH_TOKEN`` is set without
TLS and so would stop `rpcmesh up` at start in an environment set up for the CLI.

:func:`coordinator_client_security` decides, purely from the control plane's
configuration and the environment:

* TLS: the client TLS variables (``RPCMESH_TLS_CA``, ``RPCMESH_TLS_CLIENT_CERT``/``_KEY``,
  ``RPCMESH_TLS_SERVER_NAME``) when set; else, when the control plane serves TLS, TLS
  trusting the configured CA (``tls.ca_file``), or the system roots when none is given.
* Token: ``RPCMESH_TOKEN`` or ``RPCMESH_TOKEN_FILE``. Over plaintext it is sent only in
  explicit development mode (``insecure`` in the config or ``RPCMESH_INSECURE``);
  otherwise it is left out and the reason is returned as a warning, never raised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.security.client import ClientSecurity, TokenSource
from rpcmesh.security.tls import ClientTlsConfig

__all__ = ["CoordinatorSecurity", "coordinator_client_security"]

TOKEN_OVER_PLAINTEXT_WARNING = (
    "WARNING: the saga coordinator does not send RPCMESH_TOKEN over plaintext; its calls to the "
    "Registry and to participants go without a token. Configure TLS, or set RPCMESH_INSECURE "
    "(development mode) to send it anyway."
)


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


def _token(env: Mapping[str, str]) -> TokenSource | None:
    token = env.get("RPCMESH_TOKEN") or None
    if token is not None:
        return token
    token_file = env.get("RPCMESH_TOKEN_FILE")
    if not token_file:
        return None
    path = Path(token_file)

    def read_token() -> str:
        return path.read_text(encoding="utf-8").strip()

    return read_token


def coordinator_client_security(
    config: ControlPlaneConfig, environ: Mapping[str, str] | None = None
) -> CoordinatorSecurity:
    """The control plane's own client security (see the module docstring); never raises for a token."""
    env = os.environ if environ is None else environ
    tls = ClientTlsConfig.from_env(env)
    if tls is None and config.security.tls is not None:
        tls = ClientTlsConfig(ca_file=config.security.tls.ca_file)
    insecure = config.security.insecure or _flag(env, "RPCMESH_INSECURE")
    token = _token(env)
    warnings: tuple[str, ...] = ()
    if token is not None and tls is None and not insecure:
        token, warnings = None, (TOKEN_OVER_PLAINTEXT_WARNING,)
    return CoordinatorSecurity(
        security=ClientSecurity(tls=tls, token=token, insecure=insecure), warnings=warnings
    )
