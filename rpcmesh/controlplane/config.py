"""Configuration of the control plane process (`rpcmesh up`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rpcmesh.security.settings import SecuritySettings

if TYPE_CHECKING:
    from rpcmesh.controlplane.registry.address_policy import AddressPolicy


DEFAULT_COORDINATOR_NAME = "rpcmesh-coordinator"
"""The identity a minted coordinator token names when no other is given."""


@dataclass(frozen=True, kw_only=True)
class CoordinatorIdentity:
    """Who the saga coordinator inside `rpcmesh up` is when it calls the Registry and participants.

    In mTLS mode (``--tls-client-auth``) it needs a client certificate; in token mode a token
    file, or none: the control plane holds the token secret and mints the coordinator a token
    naming ``name``. Either way the identity needs an entry in the policy (docs/security.md).
    """

    cert_file: Path | None = None
    """PEM client certificate (its name is the identity); env RPCMESH_COORDINATOR_CERT."""

    key_file: Path | None = None
    """PEM key of ``cert_file``; env RPCMESH_COORDINATOR_KEY."""

    token_file: Path | None = None
    """File holding the coordinator's bearer token, read at each use; env RPCMESH_COORDINATOR_TOKEN_FILE."""

    name: str = DEFAULT_COORDINATOR_NAME
    """Subject of the token the control plane mints when no token file is given."""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("--coordinator-cert and --coordinator-key: give both or neither")
        if not self.name:
            raise ValueError("--coordinator-identity: must not be empty")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CoordinatorIdentity:
        """Read RPCMESH_COORDINATOR_CERT/_KEY/_TOKEN_FILE/_IDENTITY."""
        env = os.environ if environ is None else environ

        def path(name: str) -> Path | None:
            value = env.get(name)
            return Path(value) if value else None

        return cls(
            cert_file=path("RPCMESH_COORDINATOR_CERT"),
            key_file=path("RPCMESH_COORDINATOR_KEY"),
            token_file=path("RPCMESH_COORDINATOR_TOKEN_FILE"),
            name=env.get("RPCMESH_COORDINATOR_IDENTITY") or DEFAULT_COORDINATOR_NAME,
        )


@dataclass(frozen=True, kw_only=True)
class ControlPlaneConfig:
    """What `rpcmesh up` serves, where, and on which storage."""

    host: str = "127.0.0.1"
    """Interface to listen on."""

    port: int = 50051
    """Port to listen on; 0 picks a free one (printed at start)."""

    data_dir: Path = field(default_factory=lambda: Path(".rpcmesh"))
    """Folder of the embedded SQLite files."""

    store: str | None = None
    """``postgresql://…`` to keep Registry, EventStore and sagas in PostgreSQL; None for SQLite."""

    bus: str | None = None
    """``nats://…`` to run the Bus on NATS JetStream; None for the embedded SQLite log. Several servers
    of one cluster: comma-separated URLs (``nats://a:4222,nats://b:4222``)."""

    bus_replicas: int = 1
    """Replicas of each JetStream stream the Bus creates (3 on a 3-server cluster survives one server)."""

    bus_ping_interval: float = 5.0
    """Seconds between pings to the nats-server the Bus is connected to; after two unanswered the
    connection is taken as dead and another server of the cluster is tried (a frozen or cut-off
    server is left within about three intervals)."""

    http_host: str | None = None
    """Interface of the HTTP port (Connect API and console); None: ``host``."""

    http_port: int | None = None
    """HTTP port (docs/http-api.md); 0 picks a free one; None serves no HTTP (`rpcmesh up` turns it
    on: 8080, or a free port when ``port`` is 0)."""

    http_port_fallback: bool = False
    """When ``http_port`` is taken, serve HTTP on a free port instead of failing the start (the
    CLI's default port: a second control plane on one machine still starts)."""

    grace: float = 5.0
    """Seconds in-flight calls get to finish on shutdown (open streams are ended at once).

    Shutdown as a whole takes at most ``grace + close_timeout`` (10 s by default).
    """

    close_timeout: float = 5.0
    """Seconds each component gets to flush its state and close its stores on shutdown."""

    allow_addresses: tuple[str, ...] = ()
    """The only instance addresses Register accepts (CIDR ranges, addresses, host-name globs); empty:
    any but link-local, unspecified, multicast, broadcast and cloud metadata addresses, which stay
    refused (see :mod:`rpcmesh.controlplane.registry.address_policy`)."""

    allow_link_local_addresses: bool = False
    """Accept link-local instance addresses (metadata addresses stay refused)."""

    bus_max_topics: int = 10_000
    """Most Bus topics (dead-letter topics not counted); one more is RESOURCE_EXHAUSTED."""

    bus_max_groups: int = 10_000
    """Most durable consumer groups over all topics; one more is RESOURCE_EXHAUSTED."""

    security: SecuritySettings = field(default_factory=SecuritySettings)
    """TLS/mTLS, token secret and issuer, policy file, development mode and limits.

    The default is plaintext without authentication, which the server announces
    loudly at start.
    """

    coordinator: CoordinatorIdentity = field(default_factory=CoordinatorIdentity)
    """The saga coordinator's identity towards the Registry and the participants (secure modes)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0-65535, got {self.port}")
        if self.store is not None and not self.store.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"store: expected a postgresql:// URL, got {self.store!r}")
        if self.bus is not None and not self.bus.startswith(("nats://", "tls://")):
            raise ValueError(f"bus: expected a nats:// URL, got {self.bus!r}")
        if self.grace < 0:
            raise ValueError(f"grace: must be >= 0, got {self.grace}")
        if self.close_timeout <= 0:
            raise ValueError(f"close_timeout: must be > 0, got {self.close_timeout}")
        self.address_policy  # noqa: B018 - validates the allow-list (ValueError naming the entry)
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port: must be 0-65535, got {self.http_port}")
        if not 1 <= self.bus_replicas <= 5:
            raise ValueError(f"bus_replicas: must be 1-5, got {self.bus_replicas}")
        if not 0 < self.bus_ping_interval <= 3600:
            raise ValueError(
                f"bus_ping_interval: must be > 0 and <= 3600 seconds, got {self.bus_ping_interval}"
            )
        for name in ("bus_max_topics", "bus_max_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @property
    def address_policy(self) -> AddressPolicy:
        """The Registry's address policy built from ``allow_addresses`` and ``allow_link_local_addresses``."""
        # Imported here: the registry package imports this module.
        from rpcmesh.controlplane.registry.address_policy import AddressPolicy

        return AddressPolicy(allow=self.allow_addresses, allow_link_local=self.allow_link_local_addresses)

    @property
    def address(self) -> str:
        """host:port as configured (the port may be 0)."""
        return f"{self.host}:{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ControlPlaneConfig:
        """Read RPCMESH_HOST, RPCMESH_PORT, RPCMESH_DATA_DIR, RPCMESH_STORE, RPCMESH_BUS, RPCMESH_GRACE, the
        security variables (see :meth:`SecuritySettings.from_env`) and the coordinator's identity."""  # noqa: D205, D209
        env = os.environ if environ is None else environ
        return cls(
            host=env.get("RPCMESH_HOST", "127.0.0.1"),
            port=int(env.get("RPCMESH_PORT", "50051")),
            data_dir=Path(env.get("RPCMESH_DATA_DIR", ".rpcmesh")),
            store=env.get("RPCMESH_STORE") or None,
            bus=env.get("RPCMESH_BUS") or None,
            bus_replicas=int(env.get("RPCMESH_BUS_REPLICAS", "1")),
            bus_ping_interval=float(env.get("RPCMESH_BUS_PING_INTERVAL", "5")),
            grace=float(env.get("RPCMESH_GRACE", "5")),
            security=SecuritySettings.from_env(env),
            coordinator=CoordinatorIdentity.from_env(env),
        )
