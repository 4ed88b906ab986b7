"""A snapshot sets the client's revision to its own, even when the client had seen a later one.

A client that saw revision N+1 (through one Registry node) and then takes a
snapshot at N (from a node that read less of the shared log, or from another
registry) must resume after N: it kept N+1 before (``max``), so its next resume
skipped event N+1 for good.
"""

from __future__ import annotations

from rpcmesh.v1 import registry_pb2

from rpcmesh.client.endpoints import ServiceCore
from rpcmesh.client.policy import ServicePolicy

_PUT = registry_pb2.WATCH_EVENT_TYPE_PUT


def _put(instance_id: str, revision: int) -> registry_pb2.WatchEvent:
    instance = registry_pb2.Instance(service="svc", instance_id=instance_id, address=f"{instance_id}:1")
    return registry_pb2.WatchEvent(type=_PUT, instance=instance, revision=revision)


def test_a_snapshot_at_an_older_revision_sets_the_revision_back() -> None:
    core = ServiceCore("svc", ServicePolicy())
    core.apply(registry_pb2.WatchResponse(snapshot=True, revision=4, events=[_put("a", 4)]))
    core.apply(registry_pb2.WatchResponse(revision=5, events=[_put("b", 5)]))
    assert core.revision == 5
    core.apply(registry_pb2.WatchResponse(snapshot=True, revision=4, events=[_put("a", 4)]))
    assert core.revision == 4
    assert [endpoint.instance_id for endpoint in core.endpoints()] == ["a"]
    # The resume after 4 then brings event 5 back.
    core.apply(registry_pb2.WatchResponse(revision=5, events=[_put("b", 5)]))
    assert core.revision == 5
    assert [endpoint.instance_id for endpoint in core.endpoints()] == ["a", "b"]


def test_events_never_move_the_revision_back() -> None:
    core = ServiceCore("svc", ServicePolicy())
    core.apply(registry_pb2.WatchResponse(snapshot=True, revision=7, events=[]))
    core.apply(registry_pb2.WatchResponse(revision=6, events=[]))
    assert core.revision == 7
