"""The context of the incoming call a handler runs in: its deadline and request id.

The service host's server interceptor sets :data:`current_call` around every
handler; the mesh channel reads it so an outgoing call never outlives the call
that caused it and carries the same request id. Outside a handler nothing is
set and outgoing calls use their own policy deadline.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = [
    "REQUEST_ID_KEY",
    "CallContext",
    "current_call",
    "deadline_scope",
    "effective_deadline",
]

REQUEST_ID_KEY = "x-request-id"
"""Metadata key of the request id propagated from incoming to outgoing calls."""


@dataclass(frozen=True)
class CallContext:
    """What an outgoing call inherits from the call being handled."""

    method: str
    """Full method name of the incoming call, e.g. ``/echo.v1.Echo/Echo``."""

    deadline: float | None
    """Absolute ``time.monotonic()`` deadline of the incoming call; None when it has none."""

    request_id: str
    """Request id carried in ``x-request-id`` (generated when the caller sent none)."""

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (may be negative), or None."""
        if self.deadline is None:
            return None
        return self.deadline - (time.monotonic() if now is None else now)


current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "rpcmesh_current_call", default=None
)
"""The incoming call the current task or thread is handling, if any."""


@contextmanager
def deadline_scope(timeout: float, *, method: str = "", request_id: str = "") -> Iterator[CallContext]:
    """Bound every mesh call made inside the block by ``timeout`` seconds from now.

    An enclosing scope (or incoming call) with an earlier deadline wins.
    """
    outer = current_call.get()
    deadline = time.monotonic() + timeout
    if outer is not None and outer.deadline is not None:
        deadline = min(deadline, outer.deadline)
    ctx = CallContext(
        method=method or (outer.method if outer else ""),
        deadline=deadline,
        request_id=request_id or (outer.request_id if outer else ""),
    )
    token = current_call.set(ctx)
    try:
        yield ctx
    finally:
        current_call.reset(token)


def effective_deadline(timeout: float | None, policy_timeout: float | None, now: float) -> float | None:
    """The absolute deadline of an outgoing call: its own (or its policy's default), bounded by the caller's.

    Args:
        timeout: The ``timeout`` the caller passed to the stub, if any.
        policy_timeout: The default timeout of the method's policy, used when ``timeout`` is None.
        now: ``time.monotonic()`` at the start of the call.
    """
    own = timeout if timeout is not None else policy_timeout
    candidates = [] if own is None else [now + own]
    incoming = current_call.get()
    if incoming is not None and incoming.deadline is not None:
        candidates.append(incoming.deadline)
    return min(candidates) if candidates else None
