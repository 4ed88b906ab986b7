"""The server interceptor that authenticates, authorizes and limits every call.

:class:`SecurityInterceptor` wraps the handler of every method, in all four RPC
shapes, and before the handler sees anything:

1. admits the call on its connection (calls in flight per connection), else
   RESOURCE_EXHAUSTED;
2. authenticates the caller (bearer token or mTLS certificate), else
   UNAUTHENTICATED;
3. admits the call for the identity (calls in flight, open watches and
   subscriptions per identity), else RESOURCE_EXHAUSTED;
4. checks each request message against the policy through the per-method
   table (:mod:`rpcmesh.security.methods`), else PERMISSION_DENIED. Streams are
   checked message by message as the handler reads them, so a refused message
   never reaches the handler and changes nothing.

Install it first (outermost) so refused calls cost the least:
``grpc.aio.server(interceptors=[SecurityInterceptor(...), StatusErrorInterceptor()])``.
Handlers of streaming requests must read them through the request iterator (not
``context.read()``), which is how every rpcmesh servicer reads them.

While a handler runs, :data:`current_identity` holds the caller, so a servicer
can record who owns what (e.g. a lease).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio

from rpcmesh.security.identity import AuthenticationError, Authenticator, Identity
from rpcmesh.security.limits import ConcurrencyTracker, Limits
from rpcmesh.security.methods import PUBLIC_METHODS, accesses_for, stream_kind
from rpcmesh.security.policy import Policy

__all__ = ["ANONYMOUS", "SecurityInterceptor", "current_identity"]

ANONYMOUS = Identity("anonymous", "none")
"""The identity of callers when authentication is off (development)."""

current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "rpcmesh_current_identity", default=None
)
"""The authenticated caller of the call being handled."""

Handler = Callable[..., Any]
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class _Admission:
    connection: str
    identity: Identity
    kind: str | None
    counted_identity: bool


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, authorization and per-connection/per-identity limits for a grpc.aio server.

    Args:
        authenticator: How callers are recognised; when it is not enabled every
            caller is :data:`ANONYMOUS`, nothing is authorized and only the
            per-connection limit applies.
        policy: What identities may do. None allows every authenticated caller
            every method (service hosts, which have no per-method table).
        limits: Concurrency caps.
    """

    def __init__(self, *, authenticator: Authenticator, policy: Policy | None, limits: Limits) -> None:
        self._authenticator = authenticator
        self._policy = policy
        self._tracker = ConcurrencyTracker(limits)

    @property
    def tracker(self) -> ConcurrencyTracker:
        """The live counters (for tests and metrics)."""
        return self._tracker

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the method's handler with the checks."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in PUBLIC_METHODS:
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary_request(method, handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_unary_request(method, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_stream_request(method, handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream_request(method, handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )

    async def _admit(self, method: str, context: Context) -> _Admission:
        connection = context.peer() or "unknown"
        reason = self._tracker.acquire_connection(connection)
        if reason is not None:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        try:
            if not self._authenticator.enabled:
                return _Admission(connection, ANONYMOUS, None, counted_identity=False)
            identity = self._authenticator.authenticate(
                context.invocation_metadata() or (), context.auth_context()
            )
            kind = stream_kind(method)
            reason = self._tracker.acquire_identity(identity.name, kind)
            if reason is not None:
                await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
            return _Admission(connection, identity, kind, counted_identity=True)
        except AuthenticationError as exc:
            self._tracker.release_connection(connection)
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except BaseException:
            self._tracker.release_connection(connection)
            raise

    def _release(self, admission: _Admission) -> None:
        self._tracker.release_connection(admission.connection)
        if admission.counted_identity:
            self._tracker.release_identity(admission.identity.name, admission.kind)

    def _denial(self, admission: _Admission, method: str, request: Any) -> str | None:
        if self._policy is None or not admission.counted_identity:
            return None
        return self._policy.check(admission.identity.name, accesses_for(method, request))

    def _wrap_unary_request(self, method: str, behavior: Handler) -> Handler:
        if inspect.isasyncgenfunction(behavior):

            async def wrapped_generator(request: Any, context: Context) -> AsyncIterator[Any]:
                admission = await self._admit(method, context)
                try:
                    reason = self._denial(admission, method, request)
                    if reason is not None:
                        await _abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
                    current_identity.set(admission.identity)
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self._release(admission)

            return wrapped_generator

        async def wrapped(request: Any, context: Context) -> Any:
            admission = await self._admit(method, context)
            try:
                reason = self._denial(admission, method, request)
                if reason is not None:
                    await _abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
                current_identity.set(admission.identity)
                return await behavior(request, context)
            finally:
                self._release(admission)

        return wrapped

    def _checked(
        self, admission: _Admission, method: str, requests: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                reason = self._denial(admission, method, request)
                if reason is not None:
                    # Abort here, in whichever task reads the stream: the status
                    # is sent at once and the handler never sees the message.
                    await _abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
                yield request

        return checked()

    def _wrap_stream_request(self, method: str, behavior: Handler) -> Handler:
        if inspect.isasyncgenfunction(behavior):

            async def wrapped_generator(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                admission = await self._admit(method, context)
                try:
                    current_identity.set(admission.identity)
                    async for response in behavior(
                        self._checked(admission, method, requests, context), context
                    ):
                        yield response
                finally:
                    self._release(admission)

            return wrapped_generator

        async def wrapped(requests: AsyncIterator[Any], context: Context) -> Any:
            admission = await self._admit(method, context)
            try:
                current_identity.set(admission.identity)
                return await behavior(self._checked(admission, method, requests, context), context)
            finally:
                self._release(admission)

        return wrapped


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
