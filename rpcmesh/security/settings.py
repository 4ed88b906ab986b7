"""Security settings of a server, and what a grpc.aio server needs from them.

:class:`SecuritySettings` is the configuration (file paths, issuer, mode);
:meth:`ServerSecurity.build` reads the files once at start and gives the
credentials, the checks (as an interceptor, or applied at registration), the
server options and the warnings to print. With interceptors::

    security = ServerSecurity.build(settings)
    server = grpc.aio.server(
        interceptors=[*security.interceptors, StatusErrorInterceptor()],
        options=security.options,
        maximum_concurrent_rpcs=security.maximum_concurrent_rpcs,
    )
    port = security.add_port(server, "127.0.0.1:0")

or, cheaper per call (no interceptor machinery; StatusErrors mapped in the same
wrapper), register servicers through :meth:`ServerSecurity.guarded`::

    server = grpc.aio.server(options=security.options, maximum_concurrent_rpcs=...)
    add_EchoServicer_to_server(servicer, security.guarded(server))

Modes: with TLS settings the port is TLS (mTLS with ``client_auth``); without,
it is plaintext and :attr:`ServerSecurity.warnings` says so loudly. Bearer tokens
over plaintext are refused at start unless ``insecure`` (explicit development
mode) is set, since anyone on the path could replay them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from rpcmesh.security.guard import CallGuard, GuardedServer, guard_server
from rpcmesh.security.identity import Authenticator
from rpcmesh.security.interceptor import SecurityInterceptor
from rpcmesh.security.limits import Limits
from rpcmesh.security.policy import Policy, load_policy
from rpcmesh.security.tls import ServerTlsConfig, server_credentials
from rpcmesh.security.tokens import load_secret

__all__ = ["SecuritySettings", "ServerSecurity"]

PLAINTEXT_WARNING = (
    "WARNING: rpcmesh is serving PLAINTEXT gRPC without authentication: any process that can reach "
    "{address} can call it and read its traffic. Use TLS (--tls-cert/--tls-key, `rpcmesh certs`) "
    "outside development."
)
INSECURE_WARNING = (
    "WARNING: rpcmesh development mode (--insecure): bearer tokens are accepted over PLAINTEXT on "
    "{address}; anyone on the network path can read and replay them."
)
OPEN_POLICY_WARNING = (
    "WARNING: authentication is on but no policy file is given: every authenticated identity may do "
    "everything. Give --policy to grant least privilege."
)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, kw_only=True)
class SecuritySettings:
    """How a server protects itself; the defaults are plaintext without authentication (development)."""

    tls: ServerTlsConfig | None = None
    """TLS (and mTLS) settings; None serves plaintext."""

    token_secret_file: Path | None = None
    """File holding the HS256 secret of bearer tokens (at least 32 bytes); None accepts no tokens."""

    token_issuer: str = "rpcmesh"
    """The issuer tokens must name."""

    policy_file: Path | None = None
    """YAML authorization policy; None with authentication on lets every identity do everything."""

    insecure: bool = False
    """Explicit development mode: allow bearer tokens over plaintext."""

    limits: Limits = field(default_factory=Limits)
    """Sizes, concurrency caps and keepalive enforcement."""

    def __post_init__(self) -> None:
        if not self.token_issuer:
            raise ValueError("token_issuer: must not be empty")
        if self.policy_file is not None and not self.authentication_enabled:
            raise ValueError(
                "policy_file: needs authentication (a token secret, or TLS with required client certificates)"
            )
        if self.token_secret_file is not None and self.tls is None and not self.insecure:
            raise ValueError(
                "token_secret_file: bearer tokens over plaintext are refused; configure TLS, "
                "or set insecure (development mode) explicitly"
            )

    @property
    def authentication_enabled(self) -> bool:
        """Whether callers must present a token or a client certificate."""
        return self.token_secret_file is not None or (self.tls is not None and self.tls.client_auth)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SecuritySettings:
        """Read RPCMESH_TLS_CERT/_KEY/_CA/_CLIENT_AUTH, RPCMESH_TOKEN_SECRET_FILE, RPCMESH_TOKEN_ISSUER,
        RPCMESH_POLICY_FILE and RPCMESH_INSECURE."""  # noqa: D205, D209
        env = os.environ if environ is None else environ
        secret = env.get("RPCMESH_TOKEN_SECRET_FILE")
        policy = env.get("RPCMESH_POLICY_FILE")
        return cls(
            tls=ServerTlsConfig.from_env(env),
            token_secret_file=Path(secret) if secret else None,
            token_issuer=env.get("RPCMESH_TOKEN_ISSUER") or "rpcmesh",
            policy_file=Path(policy) if policy else None,
            insecure=_flag(env, "RPCMESH_INSECURE"),
        )


@dataclass(frozen=True, kw_only=True)
class ServerSecurity:
    """What a grpc.aio server needs, built from :class:`SecuritySettings` (files already read)."""

    settings: SecuritySettings
    """The settings this was built from."""

    credentials: grpc.ServerCredentials | None
    """TLS credentials for the port; None for plaintext."""

    interceptor: SecurityInterceptor
    """Authentication, authorization and limits; install it first (or use :meth:`guarded` instead)."""

    @classmethod
    def build(cls, settings: SecuritySettings, *, authorize: bool = True) -> ServerSecurity:
        """Read certificates, secret and policy; ValueError names what is wrong.

        Args:
            settings: The settings.
            authorize: Apply the control-plane policy (False for service hosts:
                any authenticated caller may call any method).
        """
        credentials = server_credentials(settings.tls) if settings.tls is not None else None
        secret = load_secret(settings.token_secret_file) if settings.token_secret_file is not None else None
        authenticator = Authenticator(
            token_secret=secret,
            token_issuer=settings.token_issuer,
            accept_certificates=settings.tls is not None and settings.tls.client_auth,
        )
        policy: Policy | None = None
        if authorize:
            if settings.policy_file is not None:
                policy = load_policy(settings.policy_file)
            else:
                policy = Policy(allow_all=True)
        interceptor = SecurityInterceptor(authenticator=authenticator, policy=policy, limits=settings.limits)
        return cls(settings=settings, credentials=credentials, interceptor=interceptor)

    @property
    def guard(self) -> CallGuard:
        """The checks, shared by :attr:`interceptor` and :meth:`guarded` (one set of counters)."""
        return self.interceptor.guard

    def guarded(self, server: Any, *, map_errors: bool = True) -> GuardedServer:
        """``server`` behind a proxy that applies the checks to every handler registered on it, once.

        Use it instead of :attr:`interceptors`, not with them.

        Args:
            server: A ``grpc.aio.Server`` (or a registration proxy around one).
            map_errors: Also turn StatusErrors raised by handlers into their status.
        """
        return guard_server(server, self.guard, map_errors=map_errors)

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors to list first when creating the server."""
        return [self.interceptor]

    @property
    def options(self) -> list[tuple[str, Any]]:
        """The grpc server options (sizes, HTTP/2 stream cap, keepalive enforcement)."""
        return [*self.settings.limits.server_options(), ("grpc.so_reuseport", 0)]

    @property
    def maximum_concurrent_rpcs(self) -> int:
        """Calls in flight in the whole server before grpc answers RESOURCE_EXHAUSTED."""
        return self.settings.limits.max_concurrent_rpcs

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind ``address`` with TLS or plaintext; returns the port (0 when binding failed)."""
        if self.credentials is not None:
            return server.add_secure_port(address, self.credentials)
        return server.add_insecure_port(address)

    def warnings(self, address: str) -> list[str]:
        """Lines to print loudly at start (plaintext, development mode, open policy)."""
        lines = []
        if self.settings.tls is None:
            template = INSECURE_WARNING if self.settings.token_secret_file is not None else PLAINTEXT_WARNING
            lines.append(template.format(address=address))
        if self.settings.authentication_enabled and self.settings.policy_file is None:
            lines.append(OPEN_POLICY_WARNING)
        return lines
