"""SagaCoordinator: orchestrated sagas with compensation, event-sourced on the EventStore.

The decisions live in the pure :mod:`~rpcmesh.controlplane.saga.machine`;
:class:`SagaEngine` does the I/O, writing every transition to the saga's
stream before acting on it.
"""

from rpcmesh.controlplane.saga.component import SagaCoordinatorComponent
from rpcmesh.controlplane.saga.definition import RetrySettings, validate_definition
from rpcmesh.controlplane.saga.engine import SagaEngine
from rpcmesh.controlplane.saga.invoker import (
    MeshStepInvoker,
    StepCallError,
    StepInvoker,
    check_coordinator_policy,
    coordinator_policy,
)
from rpcmesh.controlplane.saga.security import CoordinatorSecurity, coordinator_client_security

__all__ = [
    "CoordinatorSecurity",
    "MeshStepInvoker",
    "RetrySettings",
    "SagaCoordinatorComponent",
    "SagaEngine",
    "StepCallError",
    "StepInvoker",
    "check_coordinator_policy",
    "coordinator_client_security",
    "coordinator_policy",
    "validate_definition",
]
