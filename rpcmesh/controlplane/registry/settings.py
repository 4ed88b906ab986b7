"""Tunables of the Registry component, with the defaults `rpcmesh up` uses."""

from __future__ import annotations

from dataclasses import dataclass, field

from rpcmesh.controlplane.registry.address_policy import AddressPolicy


@dataclass(frozen=True, kw_only=True)
class RegistrySettings:
    """How the Registry retains events, expires leases and probes instances."""

    retain_events: int = 100_000
    """Events kept for Watch resume; older ``after_revision`` values get OUT_OF_RANGE."""

    max_watch_backlog: int = 10_000
    """Events a slow watcher may fall behind before its watch is ended with ABORTED."""

    expiry_check_interval: float = 0.2
    """Longest time (s) between two checks for expired leases."""

    poll_interval: float = 0.5
    """PostgreSQL: how often (s) a node polls the event log besides LISTEN/NOTIFY."""

    catch_up_timeout: float = 2.0
    """PostgreSQL: how long (s) a Watch resuming from a revision the database has but this node has
    not read yet waits for the node to catch up; then UNAVAILABLE (the client retries, maybe elsewhere)."""

    probes_enabled: bool = True
    """Run the active grpc.health.v1 probes instances ask for."""

    address_policy: AddressPolicy = field(default_factory=AddressPolicy)
    """Which instance addresses Register accepts; the default refuses link-local, unspecified,
    multicast, broadcast and cloud metadata addresses (see :mod:`.address_policy`)."""

    def __post_init__(self) -> None:
        if self.retain_events < 1:
            raise ValueError(f"retain_events: must be >= 1, got {self.retain_events}")
        if self.max_watch_backlog < 1:
            raise ValueError(f"max_watch_backlog: must be >= 1, got {self.max_watch_backlog}")
        if not 0 < self.expiry_check_interval <= 60:
            raise ValueError(f"expiry_check_interval: must be in (0, 60], got {self.expiry_check_interval}")
        if not 0 < self.poll_interval <= 60:
            raise ValueError(f"poll_interval: must be in (0, 60], got {self.poll_interval}")
        if not 0 < self.catch_up_timeout <= 60:
            raise ValueError(f"catch_up_timeout: must be in (0, 60], got {self.catch_up_timeout}")
        if not isinstance(self.address_policy, AddressPolicy):
            raise ValueError(f"address_policy: must be an AddressPolicy, got {self.address_policy!r}")
