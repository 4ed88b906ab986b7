"""CallGuard.wrap and the registration proxy: shapes and serializers kept, wrappers built once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from rpcmesh.security.guard import CallGuard, _GuardedGenericHandler, guard_server
from rpcmesh.security.identity import Authenticator
from rpcmesh.security.limits import Limits


async def _unary(request: Any, context: Any) -> Any:
    return request


async def _stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield request


def _guard() -> CallGuard:
    return CallGuard(authenticator=Authenticator(), policy=None, limits=Limits())


def test_wrap_keeps_shape_and_serializers() -> None:
    guard = _guard()
    for factory, attribute in [
        (grpc.unary_unary_rpc_method_handler, "unary_unary"),
        (grpc.unary_stream_rpc_method_handler, "unary_stream"),
        (grpc.stream_unary_rpc_method_handler, "stream_unary"),
        (grpc.stream_stream_rpc_method_handler, "stream_stream"),
    ]:
        behavior = _stream if attribute.endswith("_stream") else _unary
        handler = factory(behavior, request_deserializer=bytes, response_serializer=bytes)
        wrapped = guard.wrap("/a.B/C", handler)
        assert getattr(wrapped, attribute) is not None and getattr(wrapped, attribute) is not behavior
        # The deserializer is wrapped so undecodable bytes become INVALID_ARGUMENT, not UNKNOWN.
        assert wrapped.request_deserializer is not None and wrapped.request_deserializer(b"x") == b"x"
        assert wrapped.response_serializer is bytes
        assert wrapped.request_streaming == handler.request_streaming
        assert wrapped.response_streaming == handler.response_streaming


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _CatchAll(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.handler = grpc.unary_unary_rpc_method_handler(_unary)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self.handler


def test_generic_handler_wrappers_are_built_once_and_bounded() -> None:
    generic = _GuardedGenericHandler(_CatchAll(), _guard(), map_errors=True)
    first = generic.service(_Details("/a.B/C"))
    assert first is not None and generic.service(_Details("/a.B/C")) is first
    for index in range(_GuardedGenericHandler._MAX_CACHED + 10):
        generic.service(_Details(f"/made.Up/M{index}"))
    assert len(generic._wrapped) == _GuardedGenericHandler._MAX_CACHED
    assert generic.service(_Details("/a.B/C")) is first


class _Recorder:
    def __init__(self) -> None:
        self.registered: dict[str, Any] = {}
        self.generic: list[Any] = []

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered.update({f"/{service}/{name}": handler for name, handler in handlers.items()})

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_insecure_port(self, address: str) -> int:
        return 7


def test_proxy_wraps_registered_handlers_and_forwards_the_rest() -> None:
    recorder = _Recorder()
    proxy = guard_server(recorder, _guard())
    handler = grpc.unary_unary_rpc_method_handler(_unary)
    proxy.add_registered_method_handlers("a.B", {"C": handler})
    proxy.add_generic_rpc_handlers([_CatchAll()])
    assert recorder.registered["/a.B/C"].unary_unary is not _unary
    assert isinstance(recorder.generic[0], _GuardedGenericHandler)
    assert proxy.add_insecure_port("127.0.0.1:0") == 7
