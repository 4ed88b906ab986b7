"""Connect endpoints for the control plane's gRPC services, built from their descriptors at run time.

For every method of a served service (``rpcmesh.v1`` Registry, Bus, SagaCoordinator,
EventStore, and ``grpc.health.v1.Health``) :func:`build_endpoints` makes a
``connectrpc`` endpoint whose message types come from the generated descriptors (no code
generation step). Each endpoint runs the method's captured, fully wrapped gRPC handler
(see :mod:`rpcmesh.http.handlers`) with an :class:`~rpcmesh.http.context.HttpServicerContext`;
connectrpc does the protocol (Connect JSON and binary, unary and streaming envelopes,
gRPC-Web, timeouts, error JSON).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import Endpoint
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor

from rpcmesh.http.context import HttpServicerContext
from rpcmesh.http.handlers import HandlerRecorder, MethodHandler

__all__ = ["CommonNameLookup", "build_endpoints"]

logger = logging.getLogger(__name__)

CommonNameLookup = Callable[[str | None], str | None]
"""The verified client certificate's common name of the connection from ``host:port``, if any."""

Context = RequestContext[Any, Any]


def _no_common_name(client_address: str | None) -> str | None:
    return None


def _stream_type(method: MethodDescriptor) -> StreamType:
    if method.client_streaming and method.server_streaming:
        return StreamType.BIDI_STREAM
    if method.client_streaming:
        return StreamType.CLIENT_STREAM
    if method.server_streaming:
        return StreamType.SERVER_STREAM
    return StreamType.UNARY


def _servicer_context(method: str, ctx: Context, common_name_of: CommonNameLookup) -> HttpServicerContext:
    def time_remaining() -> float | None:
        left = ctx.timeout_ms
        return None if left is None else max(left / 1000.0, 0.0)

    return HttpServicerContext(
        method=method,
        headers=ctx.request_headers.allitems(),
        client_address=ctx.client_address,
        common_name=common_name_of(ctx.client_address),
        time_remaining=time_remaining,
    )


def _unexpected(method: str, error: Exception) -> ConnectError:
    # What grpc.aio answers for an exception a handler did not turn into a status.
    logger.error("HTTP call %s failed", method, exc_info=error)
    return ConnectError(Code.UNKNOWN, f"Unexpected {type(error)}: {error}")


def _end(ctx: Context, context: HttpServicerContext) -> None:
    for key, value in context.response_trailers():
        ctx.response_trailers.add(key, value)
    context.finish()


def _one_response(method: str, behavior: Any, common_name_of: CommonNameLookup) -> Any:
    """A unary or client-streaming endpoint function around ``behavior``."""

    async def call(request: Any, ctx: Context) -> Any:
        context = _servicer_context(method, ctx, common_name_of)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise context.connect_error() from None
        except ConnectError:
            raise
        except Exception as exc:
            raise _unexpected(method, exc) from exc
        finally:
            _end(ctx, context)

    return call


def _many_responses(method: str, behavior: Any, common_name_of: CommonNameLookup) -> Any:
    """A server- or bidi-streaming endpoint function around ``behavior``."""

    async def call(request: Any, ctx: Context) -> AsyncIterator[Any]:
        context = _servicer_context(method, ctx, common_name_of)
        try:
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise context.connect_error() from None
        except ConnectError:
            raise
        except Exception as exc:
            raise _unexpected(method, exc) from exc
        finally:
            _end(ctx, context)

    return call


def _endpoint(
    descriptor: MethodDescriptor, handler: MethodHandler, common_name_of: CommonNameLookup
) -> Endpoint[Any, Any]:
    stream_type = _stream_type(descriptor)
    info: MethodInfo[Any, Any] = MethodInfo(
        name=descriptor.name,
        service_name=descriptor.containing_service.full_name,
        input=message_factory.GetMessageClass(descriptor.input_type),
        output=message_factory.GetMessageClass(descriptor.output_type),
        # POST only: no method is reachable with a GET (a link or an <img> cannot call one).
        idempotency_level=IdempotencyLevel.UNKNOWN,
        stream_type=stream_type,
    )
    method = f"/{info.service_name}/{info.name}"
    if stream_type is StreamType.UNARY:
        return Endpoint.unary(info, _one_response(method, handler.unary_unary, common_name_of))
    if stream_type is StreamType.CLIENT_STREAM:
        return Endpoint.client_stream(info, _one_response(method, handler.stream_unary, common_name_of))
    if stream_type is StreamType.SERVER_STREAM:
        return Endpoint.server_stream(info, _many_responses(method, handler.unary_stream, common_name_of))
    return Endpoint.bidi_stream(info, _many_responses(method, handler.stream_stream, common_name_of))


def build_endpoints(
    recorder: HandlerRecorder,
    service_names: Iterable[str],
    *,
    common_name_of: CommonNameLookup = _no_common_name,
) -> dict[str, Endpoint[Any, Any]]:
    """``/package.Service/Method`` -> Connect endpoint, for every method of ``service_names``.

    Services whose descriptors are not in the default pool, or methods with no captured
    handler, are left out.
    """
    pool = descriptor_pool.Default()
    endpoints: dict[str, Endpoint[Any, Any]] = {}
    for service_name in service_names:
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            continue
        for descriptor in service.methods:
            path = f"/{service.full_name}/{descriptor.name}"
            handler = recorder.handler(path)
            if handler is None:
                continue
            endpoints[path] = _endpoint(descriptor, handler, common_name_of)
    return endpoints
