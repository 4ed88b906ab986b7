"""rpcmesh: gRPC-based communication between services.

The contracts live in ``rpcmesh.v1`` (generated stubs for the Registry, Bus,
SagaCoordinator and EventStore services). This package adds, on top of them:

* :class:`Mesh` / :class:`SyncMesh`: channels to services by name, with discovery,
  load balancing, retries, hedging, circuit breaking and deadlines;
* :class:`ServiceHost`: serve servicers, registered, with health and reflection;
* Bus helpers (:class:`Publisher`, :class:`Subscriber`, :func:`request`) and saga
  participant helpers (:func:`idempotent`);
* :class:`ControlPlane` (``rpcmesh up``) and the :class:`Gateway`;
* security (TLS, tokens) and telemetry (OpenTelemetry, correlation ids).

Policy classes keep their module names: ``rpcmesh.client.RetryPolicy`` is the
client's retry policy, ``rpcmesh.v1.saga_pb2.RetryPolicy`` a saga step's.
"""

from rpcmesh.bus import (
    Publisher,
    PublisherConfig,
    Received,
    Responder,
    Subscriber,
    SubscriberConfig,
    SyncPublisher,
    SyncSubscriber,
    Terminate,
    publish_event,
    request,
    request_sync,
)
from rpcmesh.client import (
    BreakerPolicy,
    BreakerSnapshot,
    BreakerState,
    EndpointView,
    HedgingPolicy,
    Mesh,
    MeshChannel,
    MeshPolicy,
    MethodPolicy,
    PolicyError,
    RetryBudgetPolicy,
    RetryPolicy,
    ServicePolicy,
    SyncMesh,
    SyncMeshChannel,
    current_call,
    deadline_scope,
    load_policy,
)
from rpcmesh.controlplane import (
    ControlPlane,
    ControlPlaneConfig,
)
from rpcmesh.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RpcMeshError,
    RpcStatusError,
    StatusError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
    from_status,
)
from rpcmesh.gateway import (
    Gateway,
    GatewayConfig,
    RouteTable,
)
from rpcmesh.host import (
    ServiceHost,
    ServiceHostConfig,
)
from rpcmesh.saga import (
    IDEMPOTENCY_KEY,
    IdempotencyStore,
    idempotency_key,
    idempotent,
)
from rpcmesh.security import (
    ClientSecurity,
    ClientTlsConfig,
    Limits,
    SecuritySettings,
    ServerTlsConfig,
    current_identity,
    mint_token,
)
from rpcmesh.telemetry import (
    TelemetryConfig,
    correlation_id,
    setup_telemetry,
    use_correlation_id,
)

__version__ = "0.1.0"

__all__ = [
    "IDEMPOTENCY_KEY",
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
