"""Fixtures for the Bus suites: a Bus served in-process on SQLite or NATS JetStream."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
import pytest
from rpcmesh.v1 import bus_pb2_grpc

from rpcmesh.controlplane.bus.component import BusComponent
from rpcmesh.controlplane.bus.nats_store import NatsBusStore
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.server import ControlPlane
from tests.support import backends


@dataclass
class BusHandle:
    """A running Bus and a stub on it."""

    address: str
    channel: grpc.aio.Channel
    stub: bus_pb2_grpc.BusStub
    prefix: str
    """Unique topic prefix for this test (runs share the NATS server)."""
    plane: ControlPlane
    config: ControlPlaneConfig

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"


@pytest.fixture(params=["sqlite", "nats"])
async def bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BusHandle]:
    """The Bus on each backend, in-process on a free port."""
    nats = backends.nats_url() if request.param == "nats" else None
    config = ControlPlaneConfig(port=0, data_dir=tmp_path / "data", bus=nats, grace=0.5)
    plane = ControlPlane(config, components=[BusComponent(config)])
    address = await plane.start()
    channel = grpc.aio.insecure_channel(address)
    prefix = f"t{uuid.uuid4().hex[:10]}"
    try:
        yield BusHandle(address, channel, bus_pb2_grpc.BusStub(channel), prefix, plane, config)
    finally:
        await channel.close()
        await plane.stop()
        if nats is not None:
            cleaner = NatsBusStore(nats)
            await cleaner.open()
            try:
                await cleaner.purge_prefix(prefix)
            finally:
                await cleaner.close()


@pytest.fixture
async def sqlite_bus(tmp_path: Path) -> AsyncIterator[BusHandle]:
    """The Bus on SQLite only."""
    config = ControlPlaneConfig(port=0, data_dir=tmp_path / "data", grace=0.5)
    plane = ControlPlane(config, components=[BusComponent(config)])
    address = await plane.start()
    channel = grpc.aio.insecure_channel(address)
    try:
        yield BusHandle(address, channel, bus_pb2_grpc.BusStub(channel), "t", plane, config)
    finally:
        await channel.close()
        await plane.stop()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A unique topic prefix on the shared NATS server, purged afterwards (if NATS is up)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        host, _, port = backends.NATS_URL.removeprefix("nats://").partition(":")
        if backends._reachable(host, int(port or 4222)):
            cleaner = NatsBusStore(backends.NATS_URL)
            await cleaner.open()
            try:
                await cleaner.purge_prefix(name)
            finally:
                await cleaner.close()
