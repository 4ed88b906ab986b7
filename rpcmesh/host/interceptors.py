"""Server interceptors of the service host: request context (deadline, request id) for handlers.

:class:`CallContextInterceptor` wraps every handler, in all four RPC shapes, so
that while it runs :data:`rpcmesh.client.context.current_call` holds the
incoming call's deadline and request id. Mesh channels read it: an outgoing
call made by the handler never outlives the incoming one and carries its
request id.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from rpcmesh.client.context import REQUEST_ID_KEY, CallContext, current_call

__all__ = ["CallContextInterceptor"]

Handler = Callable[..., Any]

# grpc reports "no deadline" as a time remaining of centuries.
_NO_DEADLINE_AFTER = 10 * 365 * 24 * 3600.0


def _call_context(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> CallContext:
    remaining = context.time_remaining()
    deadline = None
    if remaining is not None and remaining < _NO_DEADLINE_AFTER:
        deadline = time.monotonic() + remaining
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value
            break
    return CallContext(method=method, deadline=deadline, request_id=request_id or uuid.uuid4().hex)


class CallContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets :data:`~rpcmesh.client.context.current_call` around every handler."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the method's handler so it runs with the incoming call's context."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(method, handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(method, handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )


def _wrap_unary(method: str, behavior: Handler) -> Handler:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = current_call.set(_call_context(method, context))
        try:
            return await behavior(request, context)
        finally:
            current_call.reset(token)

    return wrapped


def _wrap_stream(method: str, behavior: Handler | None) -> Handler:
    assert behavior is not None
    if not inspect.isasyncgenfunction(behavior):

        async def wrapped_coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = current_call.set(_call_context(method, context))
            try:
                return await behavior(request, context)
            finally:
                current_call.reset(token)

        return wrapped_coroutine

    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        # An async generator keeps its own context across yields only if set
        # inside it; resetting would fail when the consumer runs in another task.
        current_call.set(_call_context(method, context))
        async for response in behavior(request, context):
            yield response

    return wrapped
