"""Registry fixtures: the same behavioural suite against SQLite and PostgreSQL `rpcmesh up` processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from rpcmesh.v1 import registry_pb2_grpc

from tests.support.processes import ManagedProcess, start_control_plane


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """Which store, and the extra `rpcmesh up` arguments that select it."""
    if request.param == "sqlite":
        yield "sqlite", []
    else:
        url: str = request.getfixturevalue("postgres_url")
        yield "postgresql", ["--store", url]


@pytest.fixture
def registry_process(
    request: pytest.FixtureRequest, registry_backend: tuple[str, list[str]], tmp_path: Path
) -> Iterator[tuple[ManagedProcess, str]]:
    """`rpcmesh up` on the chosen backend (the shared `control_plane` fixture for SQLite)."""
    kind, extra = registry_backend
    if kind == "sqlite":
        yield request.getfixturevalue("control_plane")
        return
    proc, address = start_control_plane(tmp_path / "data", *extra)
    try:
        yield proc, address
    finally:
        proc.kill()


@pytest.fixture
async def registry(
    registry_process: tuple[ManagedProcess, str],
) -> AsyncIterator[registry_pb2_grpc.RegistryStub]:
    """A Registry stub on a channel to the running process."""
    _, address = registry_process
    async with grpc.aio.insecure_channel(address) as channel:
        yield registry_pb2_grpc.RegistryStub(channel)
