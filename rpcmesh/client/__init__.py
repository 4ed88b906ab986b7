"""The rpcmesh client: discovery, load balancing, retries, hedging, circuit breaking and deadlines."""

from rpcmesh.client.breaker import BreakerSnapshot, BreakerState, CircuitBreaker
from rpcmesh.client.channel import MeshChannel
from rpcmesh.client.context import CallContext, current_call, deadline_scope
from rpcmesh.client.endpoints import EndpointView
from rpcmesh.client.mesh import Mesh
from rpcmesh.client.policy import (
    BreakerPolicy,
    HedgingPolicy,
    MeshPolicy,
    MethodPolicy,
    PolicyError,
    RetryBudgetPolicy,
    RetryPolicy,
    ServicePolicy,
)
from rpcmesh.client.policy_file import load_policy, parse_policy
from rpcmesh.client.sync import SyncMesh, SyncMeshChannel

__all__ = [
    "BreakerPolicy",
    "BreakerSnapshot",
    "BreakerState",
    "CallContext",
    "CircuitBreaker",
    "EndpointView",
    "HedgingPolicy",
    "Mesh",
    "MeshChannel",
    "MeshPolicy",
    "MethodPolicy",
    "PolicyError",
    "RetryBudgetPolicy",
    "RetryPolicy",
    "ServicePolicy",
    "SyncMesh",
    "SyncMeshChannel",
    "current_call",
    "deadline_scope",
    "load_policy",
    "parse_policy",
]
