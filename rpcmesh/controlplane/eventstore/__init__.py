"""EventStore: append-only streams with optimistic concurrency, a global log and subscriptions.

Storage sits behind :class:`EventStorage` (SQLite by default, PostgreSQL with
``--store``); :class:`EventStoreComponent` serves it as ``rpcmesh.v1.EventStore``
and hands the same storage object to the SagaCoordinator.
"""

from rpcmesh.controlplane.eventstore.component import EventStoreComponent, open_storage
from rpcmesh.controlplane.eventstore.model import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    NewEvent,
    StoredEvent,
    WrongExpectedVersion,
)
from rpcmesh.controlplane.eventstore.storage import EventStorage

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "EventStorage",
    "EventStoreComponent",
    "NewEvent",
    "StoredEvent",
    "WrongExpectedVersion",
    "open_storage",
]
