"""The public surface of the rpcmesh package is pinned: a change here is a change to users' imports."""

from __future__ import annotations

import rpcmesh

EXPECTED = [
    "AbortedError",
    "AlreadyExistsError",
    "BreakerPolicy",
    "BreakerSnapshot",
    "BreakerState",
    "ClientSecurity",
    "ClientTlsConfig",
    "ControlPlane",
    "ControlPlaneConfig",
    "DeadlineExceededError",
    "EndpointView",
    "FailedPreconditionError",
    "Gateway",
    "GatewayConfig",
    "HedgingPolicy",
    "IDEMPOTENCY_KEY",
    "IdempotencyStore",
    "InternalError",
    "InvalidArgumentError",
    "Limits",
    "Mesh",
    "MeshChannel",
    "MeshPolicy",
    "MethodPolicy",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PolicyError",
    "Publisher",
    "PublisherConfig",
    "Received",
    "ResourceExhaustedError",
    "Responder",
    "RetryBudgetPolicy",
    "RetryPolicy",
    "RouteTable",
    "RpcMeshError",
    "RpcStatusError",
    "SecuritySettings",
    "ServerTlsConfig",
    "ServiceHost",
    "ServiceHostConfig",
    "ServicePolicy",
    "StatusError",
    "Subscriber",
    "SubscriberConfig",
    "SyncMesh",
    "SyncMeshChannel",
    "SyncPublisher",
    "SyncSubscriber",
    "TelemetryConfig",
    "Terminate",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "correlation_id",
    "current_call",
    "current_identity",
    "deadline_scope",
    "from_rpc_error",
    "from_status",
    "idempotency_key",
    "idempotent",
    "load_policy",
    "mint_token",
    "publish_event",
    "request",
    "request_sync",
    "setup_telemetry",
    "use_correlation_id",
]


def test_public_names_are_pinned() -> None:
    assert sorted(rpcmesh.__all__) == EXPECTED


def test_every_public_callable_is_documented() -> None:
    for name in rpcmesh.__all__:
        value = getattr(rpcmesh, name)
        if callable(value):
            assert getattr(value, "__doc__", None), f"rpcmesh.{name} has no docstring"


def test_importing_rpcmesh_loads_no_opentelemetry_sdk() -> None:
    import subprocess
    import sys

    probe = "import sys, rpcmesh; print(any(m.startswith('opentelemetry.sdk') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
