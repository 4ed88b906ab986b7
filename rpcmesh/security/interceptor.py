"""The server interceptor form of the security checks, for servers built with interceptors.

:class:`SecurityInterceptor` applies a :class:`~rpcmesh.security.guard.CallGuard`
(authentication, authorization, per-connection and per-identity limits; see
:mod:`rpcmesh.security.guard` for what is checked, in which order, with which
status) to every method, in all four RPC shapes. The wrapper of each handler is
built once and reused, so a call costs the checks only. Servers that register
their servicers themselves avoid the interceptor machinery altogether with
:func:`~rpcmesh.security.guard.guard_server` (the control plane does).

Install it first (outermost) so refused calls cost the least:
``grpc.aio.server(interceptors=[SecurityInterceptor(...), StatusErrorInterceptor()])``.

While a handler runs, :data:`current_identity` holds the caller, so a servicer
can record who owns what (e.g. a lease).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio

from rpcmesh.security.guard import ANONYMOUS, CallGuard, current_identity
from rpcmesh.security.identity import Authenticator
from rpcmesh.security.limits import ConcurrencyTracker, Limits
from rpcmesh.security.policy import Policy

__all__ = ["ANONYMOUS", "SecurityInterceptor", "current_identity"]

MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, authorization and per-connection/per-identity limits for a grpc.aio server.

    The checks are a :class:`~rpcmesh.security.guard.CallGuard`'s (its arguments, same meaning),
    applied to each handler as it is looked up instead of once at registration.
    """

    _MAX_CACHED = 4096

    def __init__(self, *, authenticator: Authenticator, policy: Policy | None, limits: Limits) -> None:
        self.guard = CallGuard(authenticator=authenticator, policy=policy, limits=limits)
        """The checks (:func:`~rpcmesh.security.guard.guard_server` applies them at registration)."""
        self._wrapped: dict[int, tuple[MethodHandler, str, MethodHandler]] = {}

    @property
    def tracker(self) -> ConcurrencyTracker:
        """The live counters (for tests and metrics)."""
        return self.guard.tracker

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        """Wrap the method's handler with the checks (built once per handler object)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(id(handler))
        if cached is not None and cached[0] is handler and cached[1] == method:
            return cached[2]
        # StatusErrors are left to the StatusErrorInterceptor listed after this one.
        wrapped = self.guard.wrap(method, handler, map_errors=False)
        # Handlers rebuilt per call by later interceptors are not cached (the cache holds them alive).
        if len(self._wrapped) < self._MAX_CACHED:
            self._wrapped[id(handler)] = (handler, method, wrapped)
        return wrapped
