"""Start real processes for tests and make sure none outlives its test.

:class:`~rpcmesh.testing.ManagedProcess` does the work; this module adds what is
particular to this repository: child Python processes import the source tree
and the examples, and starters for the control plane, Echo and the gateway.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from rpcmesh import testing
from rpcmesh.testing import ADDRESS_PATTERN, rpcmesh_command

__all__ = [
    "ADDRESS_PATTERN",
    "ROOT",
    "ManagedProcess",
    "kill_leftovers",
    "python_env",
    "rpcmesh_command",
    "start_control_plane",
    "start_echo",
    "start_gateway",
]

ROOT = Path(__file__).resolve().parents[2]


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child Python processes: unbuffered, examples importable."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "examples")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ManagedProcess(testing.ManagedProcess):
    """A ManagedProcess that runs in the repository root with :func:`python_env` by default."""

    def __init__(
        self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        super().__init__(args, env=env if env is not None else python_env(), cwd=cwd or ROOT)
        _started.add(self)


# Every process a test started, so that none outlives the test session (see kill_leftovers).
_started: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


def kill_leftovers() -> list[list[str]]:
    """Kill every process started here that still runs; returns their command lines.

    The safety net behind each test's own cleanup, for a session that ends early (an interrupt,
    a SIGTERM from a `timeout` wrapper, a crash in a teardown).
    """
    leftovers = [process for process in list(_started) if process.proc.poll() is None]
    for process in leftovers:
        process.kill()
    return [process.args for process in leftovers]


def start_control_plane(
    data_dir: Path, *extra: str, env: dict[str, str] | None = None, port: int = 0
) -> tuple[ManagedProcess, str]:
    """Start `rpcmesh up` on ``port`` (a free one by default); returns the process and its address.

    Pass the port of an earlier run to restart a control plane where its clients expect it.
    """
    proc = ManagedProcess(
        rpcmesh_command("up", "--port", str(port), "--data-dir", str(data_dir), *extra),
        env=python_env(env),
    )
    try:
        address = proc.wait_for_address()
    except BaseException:
        proc.kill()
        raise
    return proc, address


def start_echo(registry: str, instance_id: str, *args: str, name: str = "echo") -> ManagedProcess:
    """Start `examples/echo/server.py` registered as ``name``; waits until it serves."""
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
        ]
    )
    try:
        proc.wait_for_address()
    except BaseException:
        proc.kill()
        raise
    return proc


def start_gateway(registry: str, *args: str) -> tuple[ManagedProcess, str]:
    """Start `rpcmesh gateway` on a free port; returns the process and its address."""
    proc = ManagedProcess(rpcmesh_command("gateway", "--registry", registry, "--port", "0", *args))
    try:
        address = proc.wait_for_address()
    except BaseException:
        proc.kill()
        raise
    return proc, address
