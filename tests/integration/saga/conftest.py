from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import duration_pb2
from rpcmesh.v1 import saga_pb2 as pb

from tests.support.processes import ManagedProcess, python_env, start_control_plane

PARTICIPANT = Path(__file__).with_name("participant.py")
SERVICES = ("ledger-a", "ledger-b", "ledger-c")


@dataclass
class Mesh:
    data_dir: Path
    address: str
    plane: ManagedProcess
    participants: dict[str, Path] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)

    def restart(self, *, kill: bool = True) -> None:
        """Restart the control plane on the same port (participants keep their Registry address)."""
        if kill:
            self.plane.kill()
        else:
            self.plane.terminate()
        port = self.address.rsplit(":", 1)[1]
        for _ in range(50):
            self.plane = ManagedProcess(
                [sys.executable, "-m", "rpcmesh", "up", "--port", port, "--data-dir", str(self.data_dir)],
                env=python_env(),
            )
            try:
                self.plane.wait_for_address(timeout=30)
                return
            except (RuntimeError, TimeoutError):
                self.plane.kill()
        raise RuntimeError("control plane did not restart")

    def effects(self, service: str) -> list[tuple[str, str, int, int, int]]:
        with sqlite3.connect(self.participants[service]) as conn:
            return list(conn.execute("SELECT saga_id, step, applied, undone, tombstone FROM effects"))

    def calls(self, service: str) -> list[tuple[str, str, str, str, str, str]]:
        with sqlite3.connect(self.participants[service]) as conn:
            return list(
                conn.execute("SELECT method, key, saga_id, step, traceparent, correlation_id FROM calls")
            )


def start_participants(world: Mesh, registry: str, directory: Path) -> list[ManagedProcess]:
    """One participant process per ledger service, registered at ``registry``, recorded in ``world``."""
    started = []
    for service in SERVICES:
        db = directory / f"{service}.db"
        proc = ManagedProcess(
            [sys.executable, str(PARTICIPANT), "--registry", registry, "--service", service, "--db", str(db)],
            env=python_env(),
        )
        started.append(proc)
        world.processes.append(proc)
        world.participants[service] = db
        proc.wait_for_line("registered")
    return started


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """`rpcmesh up` plus one participant process per ledger service, registered in its Registry."""
    plane, address = start_control_plane(tmp_path / "data")
    world = Mesh(data_dir=tmp_path / "data", address=address, plane=plane)
    try:
        start_participants(world, address, tmp_path)
        yield world
    finally:
        for proc in world.processes:
            proc.kill()
        world.plane.kill()


def step(
    name: str,
    service: str,
    method: str = "Do",
    *,
    compensate: bool = True,
    attempts: int = 0,
    timeout_s: float = 0,
    base_from: str = "input",
) -> pb.SagaStep:
    result = pb.SagaStep(
        name=name,
        service=service,
        method=f"/test.v1.Ledger/{method}",
        request=pb.PayloadTemplate(base_from=base_from),
        retry=pb.RetryPolicy(max_attempts=attempts, initial_backoff=duration_pb2.Duration(nanos=50_000_000)),
        compensation_retry=pb.RetryPolicy(initial_backoff=duration_pb2.Duration(nanos=50_000_000)),
    )
    if compensate:
        result.compensation_method = "/test.v1.Ledger/Undo"
    else:
        result.no_compensation = True
    if timeout_s:
        result.timeout.FromNanoseconds(int(timeout_s * 1e9))
    return result


def three_steps(name: str = "transfer", *, fail_last: bool = False) -> pb.SagaDefinition:
    return pb.SagaDefinition(
        name=name,
        steps=[
            step("reserve", "ledger-a"),
            step("charge", "ledger-b", "Flaky"),
            step("ship", "ledger-c", "Fail" if fail_last else "Do", compensate=not fail_last),
        ],
    )


def ok_and_failing_definitions() -> tuple[pb.SagaDefinition, pb.SagaDefinition]:
    """``ok3``, which completes (its flaky middle step is retried), and ``bad3``, compensated.

    ``bad3``'s last step always fails, so its first two steps are compensated.
    """
    ok = pb.SagaDefinition(
        name="ok3",
        steps=[step("reserve", "ledger-a"), step("charge", "ledger-b", "Flaky"), step("ship", "ledger-c")],
    )
    bad = pb.SagaDefinition(
        name="bad3",
        steps=[
            step("reserve", "ledger-a"),
            step("charge", "ledger-b"),
            step("ship", "ledger-c", "Fail", compensate=False),
        ],
    )
    return ok, bad


def stuck_definition() -> pb.SagaDefinition:
    """One step on a service with no instance: the saga stays RUNNING until it is aborted."""
    return pb.SagaDefinition(
        name="stuck",
        steps=[
            pb.SagaStep(
                name="call-ghost",
                service="ghost",
                method="/ghost.v1.Ghost/Call",
                no_compensation=True,
                timeout=duration_pb2.Duration(seconds=5),
            )
        ],
    )
