"""The interface every control-plane service implements to join `rpcmesh up`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc.aio

from rpcmesh.controlplane.config import ControlPlaneConfig


@dataclass(frozen=True)
class ControlPlaneContext:
    """What a component learns when the control plane starts it."""

    config: ControlPlaneConfig
    """The process configuration."""

    address: str
    """host:port the control plane actually listens on (the Registry is there too)."""


class Component(Protocol):
    """A control-plane service: its gRPC servicer, storage and background work.

    Lifecycle: ``add_to_server`` before the port is bound, ``start`` once it is
    bound but before calls are accepted (open storage, recover, spawn background
    tasks), ``stop`` after the server stopped accepting calls.
    """

    @property
    def service_names(self) -> Sequence[str]:
        """Full gRPC service names served, for health and reflection."""
        ...

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the servicer(s) on the server."""
        ...

    async def start(self, context: ControlPlaneContext) -> None:
        """Open storage and start background tasks."""
        ...

    async def stop(self) -> None:
        """Stop background tasks and close storage."""
        ...
