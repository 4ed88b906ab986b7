"""EventStore as a control-plane component; its storage object is shared with the SagaCoordinator."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence

import grpc.aio

from rpcmesh.controlplane.component import ControlPlaneContext, StartupError
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.eventstore.servicer import EventStoreServicer
from rpcmesh.controlplane.eventstore.storage import EventStorage
from rpcmesh.v1 import eventstore_pb2, eventstore_pb2_grpc

SQLITE_FILE = "events.db"


def open_storage(config: ControlPlaneConfig) -> EventStorage:
    """The storage the configuration asks for (not opened yet)."""
    if config.store is not None:
        from rpcmesh.controlplane.eventstore.postgres import PostgresEventStorage

        return PostgresEventStorage(config.store)
    from rpcmesh.controlplane.eventstore.sqlite import SqliteEventStorage

    return SqliteEventStorage(config.data_dir / SQLITE_FILE)


class EventStoreComponent:
    """Serves rpcmesh.v1.EventStore; ``storage`` is usable by other components once started."""

    def __init__(self, config: ControlPlaneConfig, storage: EventStorage | None = None) -> None:
        self.storage = storage if storage is not None else open_storage(config)
        self._servicer = EventStoreServicer(self.storage)
        self._opened = False

    @property
    def service_names(self) -> Sequence[str]:
        """rpcmesh.v1.EventStore."""
        return [eventstore_pb2.DESCRIPTOR.services_by_name["EventStore"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the servicer."""
        eventstore_pb2_grpc.add_EventStoreServicer_to_server(self._servicer, server)

    async def start(self, context: ControlPlaneContext) -> None:
        """Open the storage (idempotent: the SagaCoordinator may have opened it first)."""
        await self.ensure_open()

    async def ensure_open(self) -> None:
        """Open the storage once."""
        if not self._opened:
            path = getattr(self.storage, "path", None)
            try:
                await self.storage.open()
            except (sqlite3.DatabaseError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await self.storage.close()
                if path is None:
                    raise
                problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise StartupError(f"EventStore: cannot open {path}: {problem}") from exc
            self._opened = True

    async def stop(self) -> None:
        """Close the storage."""
        if self._opened:
            self._opened = False
            await self.storage.close()
