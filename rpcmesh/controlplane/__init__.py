"""The rpcmesh control plane: Registry, Bus, SagaCoordinator and EventStore in one process.

``rpcmesh up`` builds a :class:`ControlPlane` from a :class:`ControlPlaneConfig`.
Each service is a :class:`Component` with its own storage backend behind a
small interface; the control plane only wires components into one gRPC server
with health and reflection.
"""

from rpcmesh.controlplane.component import Component, ControlPlaneContext
from rpcmesh.controlplane.config import ControlPlaneConfig
from rpcmesh.controlplane.server import ControlPlane, build_components

__all__ = ["Component", "ControlPlane", "ControlPlaneConfig", "ControlPlaneContext", "build_components"]
