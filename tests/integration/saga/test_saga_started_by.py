"""Participants learn who started a saga: the coordinator sends the authenticated starter's identity.

A control plane with bearer tokens (development mode over plaintext) and a policy: ``orders`` starts a
saga whose step calls the real participant ``ledger-a``; every call the participant receives carries
``x-rpcmesh-saga-started-by: orders``, set by the coordinator from the token it verified. A caller
cannot choose it: a StartSaga that sends that header itself still records the verified identity.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc

from rpcmesh.security.client import ClientSecurity, aio_channel
from rpcmesh.security.tokens import mint_token
from tests.integration.saga.conftest import PARTICIPANT, step
from tests.integration.saga.test_saga_coordinator import payload, wait_terminal
from tests.support.processes import ManagedProcess, python_env, start_control_plane

SECRET = b"started-by-secret-0123456789abcdef"
POLICY = """\
identities:
  orders:
    sagas: ["*"]
    calls: [ledger-a]
  ledger-a: {}
  rpcmesh-coordinator: {}
"""


def _token(subject: str) -> str:
    return mint_token(SECRET, subject=subject, issuer="rpcmesh", ttl=600)


async def test_participants_receive_the_verified_starter(tmp_path: Path) -> None:
    (tmp_path / "token.secret").write_bytes(SECRET)
    (tmp_path / "policy.yaml").write_text(POLICY)
    plane, address = start_control_plane(
        tmp_path / "data",
        "--token-secret-file",
        str(tmp_path / "token.secret"),
        "--policy",
        str(tmp_path / "policy.yaml"),
        "--insecure",
    )
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
            env=python_env({"RPCMESH_TOKEN": _token("ledger-a")}),
        )
        procs.append(participant)
        participant.wait_for_line("registered")
        forged = (("x-rpcmesh-saga-started-by", "ops"),)
        async with aio_channel(address, ClientSecurity(token=_token("orders"), insecure=True)) as channel:
            stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
            definition = pb.SagaDefinition(name="pay", steps=[step("reserve", "ledger-a", compensate=False)])
            started = await stub.StartSaga(
                pb.StartSagaRequest(definition=definition, input=payload("x")), metadata=forged, timeout=10
            )
            saga = await wait_terminal(stub, started.saga.saga_id)
        assert saga.state == pb.SAGA_STATE_COMPLETED, saga
        with sqlite3.connect(tmp_path / "ledger-a.db") as conn:
            rows = conn.execute("SELECT started_by FROM calls WHERE saga_id = ?", (saga.saga_id,)).fetchall()
        assert rows and {row[0] for row in rows} == {"orders"}, rows
    finally:
        for proc in procs:
            proc.kill()
