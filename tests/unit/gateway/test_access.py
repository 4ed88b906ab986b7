"""The gateway's authorization decision per identity and resolved target (pure)."""

from __future__ import annotations

import pytest

from rpcmesh.gateway.access import GatewayAccess
from rpcmesh.security.identity import Identity
from rpcmesh.security.policy import Policy

POLICY = Policy.from_mapping(
    {
        "admins": ["ops"],
        "identities": {
            "svc-a": {"calls": ["echo-a", "orders/Get*"]},
            "echo-b": {},  # calls default to its services, which default to its own name
        },
    }
)


def who(name: str) -> Identity:
    return Identity(name, "token")


def test_calls_globs_cover_service_and_method() -> None:
    access = GatewayAccess(authentication=True, policy=POLICY)
    assert access.denial(who("svc-a"), "echo-a", "Echo") is None
    assert access.denial(who("svc-a"), "orders", "GetOrder") is None
    reason = access.denial(who("svc-a"), "echo-b", "Echo")
    assert reason is not None and "'svc-a'" in reason and "echo-b/Echo" in reason
    assert access.denial(who("svc-a"), "orders", "CancelOrder") is not None


def test_calls_default_to_own_service_and_admins_call_everything() -> None:
    access = GatewayAccess(authentication=True, policy=POLICY)
    assert access.denial(who("echo-b"), "echo-b", "Expand") is None
    assert access.denial(who("echo-b"), "echo-a", "Echo") is not None
    assert access.denial(who("ops"), "anything", "Any") is None
    reason = access.denial(who("stranger"), "echo-a", "Echo")
    assert reason is not None and "not in the policy" in reason


def test_no_policy_refuses_unless_any_identity_is_allowed() -> None:
    reason = GatewayAccess.refuse_all().denial(who("ops"), "echo-a", "Echo")
    assert reason is not None and "'ops'" in reason and "echo-a/Echo" in reason
    assert "--access-policy" in reason
    assert GatewayAccess(authentication=True, allow_any_identity=True).denial(who("x"), "s", "M") is None
    assert GatewayAccess.refuse_all().denial(None, "s", "M") is not None


def test_authentication_off_checks_nothing() -> None:
    assert GatewayAccess().denial(None, "echo-b", "Echo") is None


def test_policy_and_allow_any_identity_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="allow_any_identity"):
        GatewayAccess(authentication=True, policy=POLICY, allow_any_identity=True)
