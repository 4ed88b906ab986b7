"""`rpcmesh up` with ``RPCMESH_TOKEN`` in its environment and no TLS starts and runs sagas.

The coordinator dials its Registry and participants with the control plane's own client
security: a token it may not send over plaintext is left out with a warning instead of
stopping the control plane at start (the Mesh default, ``ClientSecurity.from_env()``, raises).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import grpc.aio
from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc

from rpcmesh.controlplane.saga.security import TOKEN_OVER_PLAINTEXT_WARNING
from tests.integration.saga.conftest import PARTICIPANT, step
from tests.integration.saga.test_saga_coordinator import payload, wait_terminal
from tests.support.processes import ManagedProcess, python_env, start_control_plane


async def test_control_plane_with_a_token_and_no_tls_runs_sagas(tmp_path: Path) -> None:
    plane, address = start_control_plane(tmp_path / "data", env={"RPCMESH_TOKEN": "operator-cli-token"})
    procs = [plane]
    try:
        participant = ManagedProcess(
            [
                sys.executable,
                str(PARTICIPANT),
                "--registry",
                address,
                "--service",
                "ledger-a",
                "--db",
                str(tmp_path / "ledger-a.db"),
            ],
            env=python_env(),
        )
        procs.append(participant)
        participant.wait_for_line("registered")
        async with grpc.aio.insecure_channel(address) as channel:
            stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
            definition = pb.SagaDefinition(name="one", steps=[step("reserve", "ledger-a", compensate=False)])
            started = await stub.StartSaga(pb.StartSagaRequest(definition=definition, input=payload("x")))
            saga = await wait_terminal(stub, started.saga.saga_id)
        assert saga.state == pb.SAGA_STATE_COMPLETED
        plane.wait_for_line(re.escape(TOKEN_OVER_PLAINTEXT_WARNING[:60]), timeout=10)
    finally:
        for proc in procs:
            proc.kill()
