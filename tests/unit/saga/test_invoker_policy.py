"""The coordinator's mesh policy: the mesh may only re-send what never reached a participant."""

from __future__ import annotations

import grpc
import pytest

from rpcmesh.client.policy import HedgingPolicy, MeshPolicy, MethodPolicy, PolicyError, ServicePolicy
from rpcmesh.controlplane.saga.invoker import StepCallError, check_coordinator_policy, coordinator_policy


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
