"""The Bus as a control-plane component: picks the store and serves ``rpcmesh.v1.Bus``.

Topics and consumer groups are capped per Bus (:class:`~rpcmesh.controlplane.bus.caps.BusCaps`:
10,000 of each by default, whether or not authentication is on); pass ``caps`` to change them.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence

import grpc.aio

from rpcmesh.controlplane.bus.broker import Broker
from rpcmesh.controlplane.bus.caps import BusCaps
from rpcmesh.controlplane.bus.servicer import BusServicer
from rpcmesh.controlplane.bus.store import BusStore
from rpcmesh.controlplane.component import ControlPlaneContext, StartupError
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc


def make_store(config: ControlPlaneConfig) -> BusStore:
    """The store the configuration asks for: NATS JetStream for ``--bus``, else SQLite."""
    if config.bus is not None:
        from rpcmesh.controlplane.bus.nats_store import NatsBusStore

        return NatsBusStore(config.bus, replicas=config.bus_replicas, ping_interval=config.bus_ping_interval)
    from rpcmesh.controlplane.bus.sqlite_store import SqliteBusStore

    return SqliteBusStore(config.data_dir / "bus.db")


class BusComponent:
    """Serves the Bus from ``rpcmesh up``."""

    def __init__(
        self, config: ControlPlaneConfig, store: BusStore | None = None, *, caps: BusCaps | None = None
    ) -> None:
        self.config = config
        self.broker = Broker(store or make_store(config), caps=caps)
        self.servicer = BusServicer(self.broker)

    @property
    def service_names(self) -> Sequence[str]:
        """``rpcmesh.v1.Bus``."""
        return [bus_pb2.DESCRIPTOR.services_by_name["Bus"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the Bus servicer."""
        bus_pb2_grpc.add_BusServicer_to_server(self.servicer, server)

    async def start(self, context: ControlPlaneContext) -> None:
        """Open the store and start housekeeping; a damaged or unreadable file is a StartupError."""
        path = getattr(self.broker.store, "path", None)
        try:
            await self.broker.start()
        except (sqlite3.DatabaseError, OSError) as exc:
            with contextlib.suppress(Exception):
                await self.broker.store.close()
            if path is None:
                raise
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(f"Bus: cannot open {path}: {problem}") from exc

    async def stop(self) -> None:
        """Close subscriptions and the store."""
        await self.broker.stop()
