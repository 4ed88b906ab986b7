"""Capture the control plane's fully wrapped gRPC method handlers, to serve them over HTTP too.

The control plane registers its servicers through a chain of registration proxies (stream
tracker, tracing, security guard), each wrapping every method handler once. A
:class:`HandlerRecorder` sits at the end of that chain, just in front of the real
``grpc.aio.Server``: it forwards each registration unchanged and keeps the handler exactly as
the server receives it. The HTTP API calls those same handlers in-process, so
authentication, authorization, limits, request checks, tracing and shutdown behave as on the
gRPC port, by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

import grpc

__all__ = ["HandlerRecorder"]

MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class HandlerRecorder:
    """A ``grpc.aio.Server`` proxy that remembers every method handler registered through it."""

    def __init__(self, server: Any) -> None:
        self.inner = server
        """The server (or proxy) registrations are forwarded to."""
        self._registered: dict[str, MethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Forward, and keep the generic handlers for lookups by method name."""
        self._generic.extend(generic_rpc_handlers)
        self.inner.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, MethodHandler]
    ) -> None:
        """Forward, and keep each handler under ``/service/method``."""
        for name, handler in method_handlers.items():
            self._registered[f"/{service_name}/{name}"] = handler
        self.inner.add_registered_method_handlers(service_name, method_handlers)

    def handler(self, method: str) -> MethodHandler | None:
        """The handler the server runs for ``method`` (``/pkg.Service/Method``), or None."""
        found = self._registered.get(method)
        if found is not None:
            return found
        details = _CallDetails(method, ())
        for generic in self._generic:
            handler = generic.service(details)  # type: ignore[arg-type]
            if handler is not None:
                return handler
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
