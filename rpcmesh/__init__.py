"""rpcmesh: gRPC-based communication between services.

The contracts live in ``rpcmesh.v1`` (generated stubs for the Registry, Bus,
SagaCoordinator and EventStore services). This package adds the control plane
(``rpcmesh up``), the resilient mesh client, the service host, and the bus and
saga helpers on top of them.
"""

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
    StatusError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
    from_status,
)

__version__ = "0.1.0"

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RpcMeshError",
    "StatusError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "from_rpc_error",
    "from_status",
]
