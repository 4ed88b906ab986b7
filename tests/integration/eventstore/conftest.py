from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest
from rpcmesh.v1 import eventstore_pb2_grpc

from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.eventstore.component import EventStoreComponent
from rpcmesh.controlplane.server import ControlPlane
from tests.support import backends


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> ControlPlaneConfig:
    """The same behavioural suite runs on both backends."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        return ControlPlaneConfig(port=0, data_dir=tmp_path / "data", store=url, grace=0.5)
    return ControlPlaneConfig(port=0, data_dir=tmp_path / "data", grace=0.5)


@pytest.fixture
async def eventstore(store_config: ControlPlaneConfig) -> AsyncIterator[eventstore_pb2_grpc.EventStoreStub]:
    """A real gRPC server serving only the EventStore, and a stub connected to it."""
    plane = ControlPlane(store_config, components=[EventStoreComponent(store_config)])
    address = await plane.start()
    channel = grpc.aio.insecure_channel(address)
    try:
        yield eventstore_pb2_grpc.EventStoreStub(channel)
    finally:
        await channel.close()
        await plane.stop()


__all__ = ["backends"]
