"""Fixtures shared by every suite: temp data dirs, control-plane processes, backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import backends
from tests.support.processes import ManagedProcess, start_control_plane


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    """`rpcmesh up` as a real subprocess on a free port with a fresh SQLite data dir."""
    proc, address = start_control_plane(tmp_path / "data")
    try:
        yield proc, address
    finally:
        proc.kill()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (skips, or fails under RPCMESH_REQUIRE_BACKENDS=1, when down)."""
    with backends.fresh_postgres_database() as url:
        yield url


@pytest.fixture
def nats_url() -> str:
    """The NATS JetStream URL (skips, or fails under RPCMESH_REQUIRE_BACKENDS=1, when down)."""
    return backends.nats_url()
