"""The Bus: durable pub/sub with consumer groups, dead letters, request/reply and events.

:class:`BusComponent` serves ``rpcmesh.v1.Bus`` from ``rpcmesh up`` over a
:class:`BusStore`: the embedded SQLite log by default, NATS JetStream with
``--bus nats://...``.
"""

from rpcmesh.controlplane.bus.component import BusComponent, make_store
from rpcmesh.controlplane.bus.store import BusStore, RetentionPolicy

__all__ = ["BusComponent", "BusStore", "RetentionPolicy", "make_store"]
