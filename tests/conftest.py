"""Fixtures shared by every suite: temp data dirs, control-plane processes, backends."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from tests.support import backends
from tests.support.processes import ManagedProcess, kill_leftovers, start_control_plane


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (e.g. from `timeout`) ends the session like Ctrl-C: teardowns and the hook below run."""
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Kill any process a test started that is still running, and say so."""
    for args in kill_leftovers():
        print(f"\nkilled a process left running: {' '.join(args)}", file=sys.stderr)


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
