"""RegistryComponent: plugs the Registry into `rpcmesh up` (the control-plane Component protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc.aio

from rpcmesh.controlplane.component import ControlPlaneContext
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.registry.node import RegistryNode
from rpcmesh.controlplane.registry.prober import HealthProber
from rpcmesh.controlplane.registry.servicer import RegistryServicer
from rpcmesh.controlplane.registry.settings import RegistrySettings
from rpcmesh.controlplane.registry.sqlite_store import SqliteRegistryStore
from rpcmesh.controlplane.registry.store import RegistryStore
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

REGISTRY_SERVICE_NAME: str = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


def build_store(config: ControlPlaneConfig, settings: RegistrySettings) -> RegistryStore:
    """PostgreSQL when ``config.store`` is set, else ``<data_dir>/registry.db``."""
    if config.store is not None:
        from rpcmesh.controlplane.registry.postgres_store import PostgresRegistryStore

        return PostgresRegistryStore(
            config.store,
            retain_events=settings.retain_events,
            poll_interval=settings.poll_interval,
            expiry_interval=settings.expiry_check_interval,
        )
    return SqliteRegistryStore(config.data_dir / "registry.db", retain_events=settings.retain_events)


class RegistryComponent:
    """The Registry service of the control plane."""

    def __init__(
        self,
        config: ControlPlaneConfig,
        settings: RegistrySettings | None = None,
        *,
        store: RegistryStore | None = None,
    ) -> None:
        self.config = config
        self.settings = settings if settings is not None else RegistrySettings()
        self.node = RegistryNode(
            store if store is not None else build_store(config, self.settings), self.settings
        )
        self.servicer = RegistryServicer(
            self.node,
            max_leases_per_identity=config.security.limits.max_leases_per_identity,
            address_policy=self.settings.address_policy,
        )
        self.prober = HealthProber(self.node, address_policy=self.settings.address_policy)

    @property
    def service_names(self) -> Sequence[str]:
        """``rpcmesh.v1.Registry``."""
        return [REGISTRY_SERVICE_NAME]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve the Registry on the control plane's server."""
        registry_pb2_grpc.add_RegistryServicer_to_server(self.servicer, server)

    async def start(self, context: ControlPlaneContext) -> None:
        """Open the store, load the view and start lease expiry."""
        await self.node.start()
        if self.settings.probes_enabled:
            self.prober.start()

    async def stop(self) -> None:
        """End watches, stop background work and close the store."""
        await self.prober.stop()
        await self.node.stop()
