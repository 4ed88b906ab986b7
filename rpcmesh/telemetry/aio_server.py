"""Server tracing for ``grpc.aio`` without interceptors: wrap each method handler once, at registration.

Any server interceptor makes a ``grpc.aio`` server look every call's handler up through an
interceptor coroutine chain (and skip its registered-method fast path); measured here that
costs more CPU per call than the span work itself. ``trace_aio_server(server)`` returns the
server behind a thin proxy whose ``add_generic_rpc_handlers`` / ``add_registered_method_handlers``
(what generated ``add_XServicer_to_server`` functions call) wrap every method handler once,
with the same wrapper ``AioServerTracingInterceptor`` uses. Register servicers on the proxy:

    server = trace_aio_server(grpc.aio.server(interceptors=[StatusErrorInterceptor()]))
    echo_pb2_grpc.add_EchoServicer_to_server(EchoServicer("a"), server)

Handlers run inside the remaining interceptors, so an interceptor that turns exceptions into
statuses (``StatusErrorInterceptor``) runs outside the span: the span then records the
exception's code as rpcmesh's ``StatusError`` carries it (``finish_with_error``), which is the
same code the client sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from rpcmesh.telemetry.grpc_aio import wrap_server_handler
from rpcmesh.telemetry.setup import Telemetry


def trace_aio_server(server: Any, telemetry: Telemetry | None = None) -> TracingServer:
    """``server`` with a SERVER span, correlation id and duration per call of every servicer added to it.

    Args:
        server: A ``grpc.aio.Server`` (servicers not yet added).
        telemetry: The handle to record into; None: ``get_telemetry()`` at each call.
    """
    return TracingServer(server, telemetry)


class TracingServer:
    """A ``grpc.aio.Server`` proxy that wraps method handlers as they are registered."""

    def __init__(self, server: Any, telemetry: Telemetry | None = None) -> None:
        self.inner = server
        """The wrapped server."""
        self._telemetry = telemetry

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register generic handlers, each behind a tracing one."""
        self.inner.add_generic_rpc_handlers(
            [_TracingGenericHandler(handler, self._telemetry) for handler in generic_rpc_handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Register pre-registered method handlers, each wrapped."""
        self.inner.add_registered_method_handlers(
            service_name,
            {
                method: wrap_server_handler(handler, f"/{service_name}/{method}", self._telemetry)
                for method, handler in method_handlers.items()
            },
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _TracingGenericHandler(grpc.GenericRpcHandler):
    """Wraps the handlers a generic handler finds; the wrapper of each is built once."""

    _MAX_CACHED = 1024

    def __init__(self, handler: grpc.GenericRpcHandler, telemetry: Telemetry | None) -> None:
        self._handler = handler
        self._telemetry = telemetry
        self._wrapped: dict[int, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The found handler, wrapped."""
        handler = self._handler.service(handler_call_details)
        if handler is None:
            return None
        cached = self._wrapped.get(id(handler))
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap_server_handler(handler, handler_call_details.method, self._telemetry)
        if len(self._wrapped) < self._MAX_CACHED:
            self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped
