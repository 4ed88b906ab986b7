"""The coordinator's mesh policy: the mesh may only re-send what never reached a participant."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from rpcmesh.client._shell import mesh_error
from rpcmesh.client.policy import HedgingPolicy, MeshPolicy, MethodPolicy, PolicyError, ServicePolicy
from rpcmesh.controlplane.saga.invoker import (
    StepCallError,
    call_was_sent,
    check_coordinator_policy,
    coordinator_policy,
)


def test_default_policy_is_non_idempotent_with_breakers() -> None:
    policy = coordinator_policy()
    check_coordinator_policy(policy)
    service = policy.for_service("anything")
    assert not service.method.idempotent and service.method.hedging is None
    assert service.instance_breaker is not None and service.service_breaker is None
    assert grpc.StatusCode.UNAVAILABLE not in service.instance_breaker.failure_codes


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (MeshPolicy(default=ServicePolicy(method=MethodPolicy(idempotent=True))), "default.method"),
        (
            MeshPolicy(
                services={
                    "pay": ServicePolicy(
                        methods={"Charge": MethodPolicy(idempotent=True, hedging=HedgingPolicy())}
                    )
                }
            ),
            "services[pay].methods[Charge]",
        ),
    ],
)
def test_idempotent_or_hedged_methods_are_refused(policy: MeshPolicy, field: str) -> None:
    with pytest.raises(PolicyError, match=field.replace("[", r"\[").replace("]", r"\]")):
        check_coordinator_policy(policy)


def test_step_call_error_is_sent_unless_told() -> None:
    assert StepCallError(14, "x").sent
    assert not StepCallError(14, "x", sent=False).sent


def test_a_failed_call_was_sent_unless_the_mesh_raised_it_or_the_connection_failed() -> None:
    def error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)

    assert not call_was_sent(mesh_error(grpc.StatusCode.UNAVAILABLE, "no instance of ledger-a"))
    assert not call_was_sent(
        mesh_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before sending")
    )
    assert not call_was_sent(error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    assert call_was_sent(error(grpc.StatusCode.UNAVAILABLE, "try again"))  # the participant answered
    assert call_was_sent(error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert call_was_sent(error(grpc.StatusCode.FAILED_PRECONDITION, "insufficient funds"))
