"""The per-method handler wrapper that admits, authenticates, authorizes and limits calls.

:class:`CallGuard` builds, once per method, a handler around the servicer's that,
before the handler sees anything:

1. admits the call on its connection (calls in flight per connection), else
   RESOURCE_EXHAUSTED;
2. authenticates the caller (bearer token or mTLS certificate), else
   UNAUTHENTICATED;
3. admits the call for the identity (calls in flight, open watches and
   subscriptions per identity), else RESOURCE_EXHAUSTED;
4. checks each request message against the policy through the per-method
   table (:mod:`rpcmesh.security.methods`), else PERMISSION_DENIED. Streams are
   checked message by message as the handler reads them, so a refused message
   never reaches the handler and changes nothing;

and, when built with ``map_errors``, turns an rpcmesh :class:`~rpcmesh.errors.StatusError`
raised by the handler into its precise status (what
:class:`~rpcmesh.errors.StatusErrorInterceptor` does), so one wrapper does both.

With authentication off only step 1 remains: the wrapper counts the call on its
connection, sets :data:`current_identity` to :data:`ANONYMOUS` and passes requests
through untouched (no identity, policy or per-message work).

Two ways to install it:

- at registration (no server interceptor, no per-call handler lookup through an
  interceptor chain): :func:`guard_server` returns the server behind a proxy whose
  ``add_generic_rpc_handlers`` / ``add_registered_method_handlers`` (what the
  generated ``add_XServicer_to_server`` functions call) wrap every handler once;
- as :class:`~rpcmesh.security.interceptor.SecurityInterceptor`, which reuses the
  wrapper built for each handler.

Handlers of streaming requests must read them through the request iterator (not
``context.read()``), which is how every rpcmesh servicer reads them.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeAlias

import grpc
import grpc.aio

from rpcmesh.errors import PermissionDeniedError, RpcStatusError, StatusError
from rpcmesh.security.decoding import Undecodable, reject_bad_requests, tolerant_deserializer
from rpcmesh.security.identity import AuthenticationError, Authenticator, Identity
from rpcmesh.security.limits import ConcurrencyTracker, Limits
from rpcmesh.security.methods import PUBLIC_METHODS, accesses_for, stream_kind
from rpcmesh.security.policy import Access, Policy

__all__ = [
    "ANONYMOUS",
    "CallGuard",
    "GuardedServer",
    "authorize",
    "current_identity",
    "guard_server",
    "may",
]

ANONYMOUS = Identity("anonymous", "none")
"""The identity of callers when authentication is off (development)."""

current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "rpcmesh_current_identity", default=None
)
"""The authenticated caller of the call being handled."""

_current_policy: contextvars.ContextVar[Policy | None] = contextvars.ContextVar(
    "rpcmesh_current_policy", default=None
)
"""The policy the call being handled was admitted under (None: no policy, everything allowed)."""


def may(*accesses: Access) -> bool:
    """Whether the caller of the call being handled may perform every one of ``accesses``.

    For checks that need the object itself, which the per-method table cannot see from the
    request alone (the definition a saga id belongs to, the sagas a list may show). True when
    the call was admitted without a policy (authentication off, or every identity allowed).
    """
    return _denial_reason(accesses) is None


def authorize(*accesses: Access) -> None:
    """Raise PERMISSION_DENIED (naming the identity and the object) unless :func:`may` allows."""
    reason = _denial_reason(accesses)
    if reason is not None:
        raise PermissionDeniedError(reason)


def _denial_reason(accesses: Sequence[Access]) -> str | None:
    policy, identity = _current_policy.get(), current_identity.get()
    if policy is None or identity is None:
        return None
    return policy.check(identity.name, accesses)


Handler = Callable[..., Any]
Context = grpc.aio.ServicerContext[Any, Any]
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

_NOTHING: tuple[type[BaseException], ...] = ()


class CallGuard:
    """Authentication, authorization and per-connection/per-identity limits, as handler wrappers.

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

    def wrap(self, method: str, handler: MethodHandler, *, map_errors: bool = True) -> MethodHandler:
        """``handler`` of ``method`` (``/pkg.Service/Method``) behind the checks; build it once per method.

        Args:
            method: The full method name.
            handler: The servicer's handler (any RPC shape, async).
            map_errors: Also turn a StatusError raised by the handler into its status.
        """
        mapped = (StatusError,) if map_errors else _NOTHING
        if handler.unary_unary:
            factory: Callable[..., MethodHandler] = grpc.unary_unary_rpc_method_handler
            behavior, stream_requests = handler.unary_unary, False
        elif handler.unary_stream:
            factory, behavior, stream_requests = (
                grpc.unary_stream_rpc_method_handler,
                handler.unary_stream,
                False,
            )
        elif handler.stream_unary:
            factory, behavior, stream_requests = (
                grpc.stream_unary_rpc_method_handler,
                handler.stream_unary,
                True,
            )
        else:
            assert handler.stream_stream is not None
            factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
            stream_requests = True
        # Innermost: undecodable bytes and unknown enum numbers are INVALID_ARGUMENT, not UNKNOWN.
        behavior = reject_bad_requests(method, behavior, stream_requests=stream_requests)
        if method in PUBLIC_METHODS:
            wrapped = _map_only(behavior, mapped) if map_errors else behavior
        elif not self._authenticator.enabled:
            wrapped = self._open(behavior, mapped)
        elif stream_requests:
            wrapped = self._stream_request(method, behavior, mapped)
        else:
            wrapped = self._unary_request(method, behavior, mapped)
        return factory(
            wrapped, tolerant_deserializer(handler.request_deserializer), handler.response_serializer
        )

    # Authentication off: the per-connection cap only.

    def _open(self, behavior: Handler, mapped: tuple[type[BaseException], ...]) -> Handler:
        acquire = self._tracker.acquire_connection
        release = self._tracker.release_connection

        if inspect.isasyncgenfunction(behavior):

            async def open_generator(request: Any, context: Context) -> AsyncIterator[Any]:
                connection = context.peer() or "unknown"
                reason = acquire(connection)
                if reason is not None:
                    await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
                try:
                    current_identity.set(ANONYMOUS)
                    async for response in behavior(request, context):
                        yield response
                except mapped as exc:
                    await _abort_with(context, exc)
                finally:
                    release(connection)

            return open_generator

        async def open_call(request: Any, context: Context) -> Any:
            connection = context.peer() or "unknown"
            reason = acquire(connection)
            if reason is not None:
                await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
            try:
                current_identity.set(ANONYMOUS)
                return await behavior(request, context)
            except mapped as exc:
                await _abort_with(context, exc)
            finally:
                release(connection)

        return open_call

    # Authentication on: every check.

    async def _admit(self, method: str, kind: str | None, context: Context) -> tuple[str, Identity]:
        """Admit the call on its connection and for its identity; aborts with the precise status."""
        connection = context.peer() or "unknown"
        reason = self._tracker.acquire_connection(connection)
        if reason is not None:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        try:
            identity = self._authenticator.authenticate(
                context.invocation_metadata() or (), context.auth_context()
            )
            reason = self._tracker.acquire_identity(identity.name, kind)
            if reason is not None:
                await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
            return connection, identity
        except AuthenticationError as exc:
            self._tracker.release_connection(connection)
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except BaseException:
            self._tracker.release_connection(connection)
            raise

    def _release(self, connection: str, identity: Identity, kind: str | None) -> None:
        self._tracker.release_connection(connection)
        self._tracker.release_identity(identity.name, kind)

    def _denial(self, identity: Identity, method: str, request: Any) -> str | None:
        if self._policy is None or isinstance(request, Undecodable):
            return None  # an undecodable request is refused by the innermost check, before any handler
        return self._policy.check(identity.name, accesses_for(method, request))

    def _unary_request(
        self, method: str, behavior: Handler, mapped: tuple[type[BaseException], ...]
    ) -> Handler:
        kind = stream_kind(method)

        if inspect.isasyncgenfunction(behavior):

            async def guarded_generator(request: Any, context: Context) -> AsyncIterator[Any]:
                connection, identity = await self._admit(method, kind, context)
                try:
                    reason = self._denial(identity, method, request)
                    if reason is not None:
                        await _abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
                    current_identity.set(identity)
                    _current_policy.set(self._policy)
                    async for response in behavior(request, context):
                        yield response
                except mapped as exc:
                    await _abort_with(context, exc)
                finally:
                    self._release(connection, identity, kind)

            return guarded_generator

        async def guarded(request: Any, context: Context) -> Any:
            connection, identity = await self._admit(method, kind, context)
            try:
                reason = self._denial(identity, method, request)
                if reason is not None:
                    await _abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
                current_identity.set(identity)
                _current_policy.set(self._policy)
                return await behavior(request, context)
            except mapped as exc:
                await _abort_with(context, exc)
            finally:
                self._release(connection, identity, kind)

        return guarded

    def _checked(
        self, identity: Identity, method: str, requests: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        if self._policy is None:
            return requests

        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                reason = self._denial(identity, method, request)
                if reason is not None:
                    # Abort here, in whichever task reads the stream: the status
                    # is sent at once and the handler never sees the message.
                    await _abort(context, grpc.StatusCode.PERMISSION_DENIED, reason)
                yield request

        return checked()

    def _stream_request(
        self, method: str, behavior: Handler, mapped: tuple[type[BaseException], ...]
    ) -> Handler:
        kind = stream_kind(method)

        if inspect.isasyncgenfunction(behavior):

            async def guarded_generator(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                connection, identity = await self._admit(method, kind, context)
                try:
                    current_identity.set(identity)
                    _current_policy.set(self._policy)
                    async for response in behavior(
                        self._checked(identity, method, requests, context), context
                    ):
                        yield response
                except mapped as exc:
                    await _abort_with(context, exc)
                finally:
                    self._release(connection, identity, kind)

            return guarded_generator

        async def guarded(requests: AsyncIterator[Any], context: Context) -> Any:
            connection, identity = await self._admit(method, kind, context)
            try:
                current_identity.set(identity)
                _current_policy.set(self._policy)
                return await behavior(self._checked(identity, method, requests, context), context)
            except mapped as exc:
                await _abort_with(context, exc)
            finally:
                self._release(connection, identity, kind)

        return guarded


def _map_only(behavior: Handler, mapped: tuple[type[BaseException], ...]) -> Handler:
    """Public methods (health): no checks, StatusErrors still mapped."""
    if inspect.isasyncgenfunction(behavior):

        async def mapped_generator(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request, context):
                    yield response
            except mapped as exc:
                await _abort_with(context, exc)

        return mapped_generator

    async def mapped_call(request: Any, context: Context) -> Any:
        try:
            return await behavior(request, context)
        except mapped as exc:
            await _abort_with(context, exc)

    return mapped_call


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


async def _abort_with(context: Context, error: BaseException) -> NoReturn:
    assert isinstance(error, StatusError)
    if isinstance(error, RpcStatusError):
        # A downstream call's failure escaped the handler: the caller gets UNKNOWN, as from
        # StatusErrorInterceptor, not the downstream status (an UNAVAILABLE would make it retry).
        raise error
    await context.abort_with_status(error.to_rpc_status())
    raise AssertionError("context.abort_with_status returned")  # pragma: no cover - abort always raises


def guard_server(server: Any, guard: CallGuard, *, map_errors: bool = True) -> GuardedServer:
    """``server`` behind a proxy that wraps every handler registered on it with ``guard``, once.

    Register servicers on the returned proxy (it forwards everything else to the
    server). Proxies nest: the one closest to the server wraps outermost, so put the
    guard innermost in a chain of registration proxies to have refused calls cost
    the least, e.g. ``trace_aio_server(guard_server(server, guard))``.

    Args:
        server: A ``grpc.aio.Server`` (servicers not yet added), or another proxy.
        guard: The checks.
        map_errors: Also turn StatusErrors raised by handlers into their status (then
            the server needs no ``StatusErrorInterceptor``).
    """
    return GuardedServer(server, guard, map_errors=map_errors)


class GuardedServer:
    """A ``grpc.aio.Server`` proxy that wraps handlers with a :class:`CallGuard` as they are registered."""

    def __init__(self, server: Any, guard: CallGuard, *, map_errors: bool = True) -> None:
        self.inner = server
        """The wrapped server (or proxy)."""
        self.guard = guard
        """The checks applied to every handler."""
        self._map_errors = map_errors

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register generic handlers, each behind a guarded one."""
        self.inner.add_generic_rpc_handlers(
            [
                _GuardedGenericHandler(handler, self.guard, self._map_errors)
                for handler in generic_rpc_handlers
            ]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, MethodHandler]
    ) -> None:
        """Register pre-registered method handlers, each wrapped."""
        self.inner.add_registered_method_handlers(
            service_name,
            {
                method: self.guard.wrap(f"/{service_name}/{method}", handler, map_errors=self._map_errors)
                for method, handler in method_handlers.items()
            },
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    """Wraps the handlers a generic handler finds; the wrapper of each method is built once."""

    _MAX_CACHED = 4096

    def __init__(self, handler: grpc.GenericRpcHandler, guard: CallGuard, map_errors: bool) -> None:
        self._handler = handler
        self._guard = guard
        self._map_errors = map_errors
        self._wrapped: dict[str, tuple[MethodHandler, MethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> MethodHandler | None:
        """The found handler, wrapped."""
        handler = self._handler.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._guard.wrap(method, handler, map_errors=self._map_errors)
        # Bounded: a catch-all generic handler must not let callers grow the cache with made-up names.
        if cached is not None or len(self._wrapped) < self._MAX_CACHED:
            self._wrapped[method] = (handler, wrapped)
        return wrapped
