"""The interface every control-plane service implements to join `rpcmesh up`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc.aio

from rpcmesh.controlplane.config import ControlPlaneConfig


class StartupError(Exception):
    """A control plane (or gateway) cannot start: one line naming the cause and the file, folder or port.

    The CLI prints it as ``rpcmesh up: <message>`` and exits 1, without a traceback.
    """


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
    tasks), ``stop`` after the server stopped accepting calls and every open stream
    has ended (its handler's cleanup has run): flush state, stop tasks, close storage.
    ``stop`` gets ``config.close_timeout`` seconds before it is abandoned. A storage
    problem at ``start`` is best raised as :class:`StartupError` naming the file.
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
