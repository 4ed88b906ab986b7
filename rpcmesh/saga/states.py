"""The saga states a watcher can stop at: the saga will not move again on its own.

All of them but FAILED_COMPENSATION are final. A FAILED_COMPENSATION saga waits for an
operator (``RetryCompensation`` takes it back to COMPENSATING, ``ResolveSaga`` closes it as
RESOLVED_MANUALLY), so it is settled but not final.
"""

from __future__ import annotations

from rpcmesh.v1 import saga_pb2

SETTLED_STATES: frozenset[int] = frozenset(
    {
        saga_pb2.SAGA_STATE_COMPLETED,
        saga_pb2.SAGA_STATE_COMPENSATED,
        saga_pb2.SAGA_STATE_FAILED_COMPENSATION,
        saga_pb2.SAGA_STATE_ABORTED,
        saga_pb2.SAGA_STATE_RESOLVED_MANUALLY,
    }
)
"""States a saga rests in until an operator acts, if ever (see the module docstring)."""
