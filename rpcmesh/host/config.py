"""Configuration of a service host: what it serves, where, and how it registers."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rpcmesh.security.client import ClientSecurity
from rpcmesh.security.limits import Limits
from rpcmesh.security.settings import SecuritySettings

__all__ = ["HOST_LIMITS", "ServiceHostConfig", "host_security_from_env"]

HOST_LIMITS = Limits(max_receive_message_bytes=4 * 1024 * 1024)
"""Limits of a service host: the control plane's, but gRPC's usual 4 MiB request size for user services."""


def host_security_from_env(environ: Mapping[str, str] | None = None) -> SecuritySettings:
    """``SecuritySettings.from_env`` (``RPCMESH_TLS_CERT``/``_KEY``/``_CA``/``_CLIENT_AUTH``,
    ``RPCMESH_TOKEN_SECRET_FILE``, ``RPCMESH_INSECURE``) with the service-host limits."""  # noqa: D205, D209
    settings = SecuritySettings.from_env(environ)
    return SecuritySettings(
        tls=settings.tls,
        token_secret_file=settings.token_secret_file,
        token_issuer=settings.token_issuer,
        insecure=settings.insecure,
        limits=HOST_LIMITS,
    )


_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, kw_only=True)
class ServiceHostConfig:
    """Settings of one :class:`~rpcmesh.host.ServiceHost`."""

    service: str
    """Name the instance registers under (a DNS label: lowercase letters, digits, '-')."""

    registry: Sequence[str] | str
    """Registry address(es) ``host:port``; tried in turn when one is unreachable."""

    host: str = "127.0.0.1"
    """Interface to listen on."""

    port: int = 0
    """Port to listen on; 0 picks a free one."""

    advertise_host: str | None = None
    """Host put in the registered address; defaults to ``host`` (or 127.0.0.1 when listening on 0.0.0.0)."""

    instance_id: str = ""
    """Instance id; empty lets the Registry assign one."""

    ttl: float = 10.0
    """Lease TTL in seconds (1 s to 1 h); renewed every third of it."""

    version: str = ""
    """Version registered with the instance."""

    zone: str = ""
    """Zone registered with the instance (used by zone-preferring clients)."""

    tags: Sequence[str] = ()
    """Tags registered with the instance."""

    metadata: Mapping[str, str] = field(default_factory=dict)
    """Metadata registered with the instance."""

    grace: float = 5.0
    """Seconds in-flight calls get to finish on shutdown."""

    register: bool = True
    """Whether to register with the Registry at all (False serves only)."""

    security: SecuritySettings = field(default_factory=lambda: SecuritySettings(limits=HOST_LIMITS))
    """How the host's own port is protected: TLS/mTLS, accepted tokens, limits (default plaintext,
    which the host says loudly at start). Any authenticated caller may call any method; handlers
    read the caller with ``rpcmesh.security.current_identity``. A policy file is not used here."""

    registry_security: ClientSecurity | None = None
    """How the host reaches the Registry (TLS, client certificate, its identity's token);
    None: ``ClientSecurity.from_env()`` when the host starts."""

    def __post_init__(self) -> None:
        if not _SERVICE_NAME.match(self.service):
            raise ValueError(
                f"service: must be a DNS label (lowercase letters, digits, '-'), got {self.service!r}"
            )
        registries = [self.registry] if isinstance(self.registry, str) else list(self.registry)
        if self.register and not registries:
            raise ValueError("registry: at least one address is needed")
        for address in registries:
            if ":" not in address:
                raise ValueError(f"registry: expected host:port, got {address!r}")
        object.__setattr__(self, "registry", tuple(registries))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0-65535, got {self.port}")
        if not 1.0 <= self.ttl <= 3600.0:
            raise ValueError(f"ttl: must be between 1 s and 1 h, got {self.ttl}")
        if self.grace < 0:
            raise ValueError(f"grace: must be >= 0, got {self.grace}")
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def registries(self) -> tuple[str, ...]:
        """The Registry addresses as a tuple."""
        return tuple(self.registry)

    def advertised(self, port: int) -> str:
        """The address registered for the bound ``port``."""
        host = self.advertise_host or ("127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host)
        return f"{host}:{port}"
