"""Events the SagaCoordinator did not write cannot get into its streams, nor stop it if they are there.

The coordinator keeps each saga in the EventStore stream ``saga-<id>`` and each definition in
``sagadef-<name>``. Before, any EventStore client could append to those streams: one event that
was not a saga record (``AppendToStream("saga-x", [Note])``) made every follower node stop
mirroring the log for good (the pull raised on it, forever), a node taking over could not catch
up and so never led, and an embedded plane no longer started. Now the EventStore API refuses such
appends (PERMISSION_DENIED naming the stream, nothing written), and records written before that
(straight into the database here) are logged and skipped. Real `rpcmesh up` processes on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import pytest
from rpcmesh.v1 import eventstore_pb2 as es
from rpcmesh.v1 import eventstore_pb2_grpc, saga_pb2_grpc
from rpcmesh.v1 import saga_pb2 as pb

from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.eventstore.component import open_storage
from rpcmesh.controlplane.eventstore.model import ANY, NewEvent
from tests.integration.saga.conftest import stuck_definition
from tests.support.processes import ManagedProcess, start_control_plane

FOREIGN = {
    "saga-note": NewEvent(event_id="n1", event_type="Note", data=b"{}"),
    "saga-garbled": NewEvent(event_id="g1", event_type="SagaStarted", data=b"not json"),
    "sagadef-garbled": NewEvent(event_id="d1", event_type="DefinitionRegistered", data=b"\xff\x00junk"),
}


def start(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        started = saga_pb2_grpc.SagaCoordinatorStub(channel).StartSaga(
            pb.StartSagaRequest(definition=stuck_definition(), idempotency_key=uuid.uuid4().hex), timeout=30
        )
    return started.saga.saga_id


def listed(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        sagas = saga_pb2_grpc.SagaCoordinatorStub(channel).ListSagas(
            pb.ListSagasRequest(page_size=100), timeout=30
        )
    return {saga.saga_id for saga in sagas.sagas}


async def write_foreign(config: ControlPlaneConfig) -> None:
    """Append the foreign records straight into the store, as an older version's API allowed."""
    storage = open_storage(config)
    await storage.open()
    try:
        for stream, event in FOREIGN.items():
            await storage.append(stream, ANY, [event])
    finally:
        await storage.close()


def test_the_eventstore_refuses_appends_to_the_coordinators_streams(tmp_path: Path) -> None:
    plane, address = start_control_plane(tmp_path / "data")
    try:
        with grpc.insecure_channel(address) as channel:
            events = eventstore_pb2_grpc.EventStoreStub(channel)
            for stream in ("saga-x", "sagadef-orders", f"saga-{start(address)}"):
                request = es.AppendToStreamRequest(
                    stream=stream,
                    expected_state=es.EXPECTED_STATE_ANY,
                    events=[es.EventData(event_id="e1", event_type="Note", data=b"{}")],
                )
                with pytest.raises(grpc.RpcError) as refused:
                    events.AppendToStream(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, stream
                assert "stream" in (refused.value.details() or "")
            read = events.ReadStream(es.ReadStreamRequest(stream="saga-x", page_size=10), timeout=30)
            assert list(read.events) == []
            # Other names are anyone's, including look-alikes.
            for stream in ("sagas-report", "orders-saga-1"):
                request = es.AppendToStreamRequest(
                    stream=stream,
                    expected_state=es.EXPECTED_STATE_ANY,
                    events=[es.EventData(event_id="e1", event_type="Note", data=b"{}")],
                )
                assert events.AppendToStream(request, timeout=30).current_revision == 0
    finally:
        plane.kill()


def test_an_embedded_plane_starts_past_foreign_records_and_keeps_its_sagas(tmp_path: Path) -> None:
    data = tmp_path / "data"
    plane, address = start_control_plane(data)
    try:
        saga_id = start(address)
    finally:
        plane.terminate()
    asyncio.run(write_foreign(ControlPlaneConfig(data_dir=data)))
    plane, address = start_control_plane(data)
    try:
        assert saga_id in listed(address)
        assert start(address) in listed(address)
    finally:
        plane.kill()


@pytest.mark.backend
def test_a_follower_keeps_mirroring_past_foreign_records_on_postgres(
    postgres_url: str, tmp_path: Path
) -> None:
    processes: list[ManagedProcess] = []
    try:
        a, a_address = start_control_plane(tmp_path / "a", "--store", postgres_url)
        processes.append(a)
        b, b_address = start_control_plane(tmp_path / "b", "--store", postgres_url)
        processes.append(b)
        asyncio.run(write_foreign(ControlPlaneConfig(data_dir=tmp_path / "x", store=postgres_url)))
        # Sagas started through either node appear in the other's list (each node mirrors the log).
        started = {start(a_address), start(b_address)}
        deadline = time.monotonic() + 20
        while not (started <= listed(a_address) and started <= listed(b_address)):
            assert time.monotonic() < deadline, "a node stopped following the saga log"
            time.sleep(0.1)
    finally:
        for proc in processes:
            proc.kill()
