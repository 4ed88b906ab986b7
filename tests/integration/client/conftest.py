"""Fixtures for the client suites: Echo instances as real processes registered with a real control plane."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest

from tests.support.processes import ROOT, ManagedProcess, python_env

EchoFactory = Callable[..., ManagedProcess]


@pytest.fixture
def echo_instances(control_plane: tuple[ManagedProcess, str]) -> Iterator[EchoFactory]:
    """Start `examples/echo/server.py` instances registered with the control plane; all killed after."""
    _, registry = control_plane
    started: list[ManagedProcess] = []

    def start(instance_id: str, *args: str, name: str = "echo") -> ManagedProcess:
        proc = ManagedProcess(
            [
                sys.executable,
                str(ROOT / "examples" / "echo" / "server.py"),
                "--registry",
                registry,
                "--name",
                name,
                "--instance-id",
                instance_id,
                *args,
            ],
            env=python_env(),
        )
        started.append(proc)
        proc.wait_for_address()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()
