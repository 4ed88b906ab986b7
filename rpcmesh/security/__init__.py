"""Security for rpcmesh: TLS and mTLS, identities, authorization policy and limits against abuse.

Servers build a :class:`ServerSecurity` from :class:`SecuritySettings` (credentials,
the checks as one interceptor or applied at registration, server options); clients
dial with :class:`ClientSecurity` (``aio_channel``/``sync_channel``). ``rpcmesh certs``
makes a development CA and certificates; ``rpcmesh token`` mints bearer tokens.
"""

from rpcmesh.security.client import (
    ClientSecurity,
    TokenSource,
    aio_channel,
    sync_channel,
    token_call_credentials,
)
from rpcmesh.security.guard import CallGuard, GuardedServer, guard_server
from rpcmesh.security.identity import AUTHORIZATION_KEY, AuthenticationError, Authenticator, Identity
from rpcmesh.security.interceptor import ANONYMOUS, SecurityInterceptor, current_identity
from rpcmesh.security.limits import ConcurrencyTracker, Limits
from rpcmesh.security.policy import Access, Action, IdentityPermissions, Policy, load_policy
from rpcmesh.security.settings import SecuritySettings, ServerSecurity
from rpcmesh.security.tls import ClientTlsConfig, ServerTlsConfig, channel_credentials, server_credentials
from rpcmesh.security.tokens import TokenClaims, TokenError, load_secret, mint_token, verify_token

__all__ = [
    "ANONYMOUS",
    "AUTHORIZATION_KEY",
    "Access",
    "Action",
    "AuthenticationError",
    "Authenticator",
    "CallGuard",
    "ClientSecurity",
    "ClientTlsConfig",
    "ConcurrencyTracker",
    "GuardedServer",
    "Identity",
    "IdentityPermissions",
    "Limits",
    "Policy",
    "SecurityInterceptor",
    "SecuritySettings",
    "ServerSecurity",
    "ServerTlsConfig",
    "TokenClaims",
    "TokenError",
    "TokenSource",
    "aio_channel",
    "channel_credentials",
    "current_identity",
    "guard_server",
    "load_policy",
    "load_secret",
    "mint_token",
    "server_credentials",
    "sync_channel",
    "token_call_credentials",
    "verify_token",
]
