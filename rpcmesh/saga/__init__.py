"""Helpers for saga participants: idempotent handlers keyed by ``x-idempotency-key``."""

from rpcmesh.saga.idempotency import IDEMPOTENCY_KEY, IdempotencyStore, idempotency_key, idempotent
from rpcmesh.saga.states import SETTLED_STATES

__all__ = ["IDEMPOTENCY_KEY", "SETTLED_STATES", "IdempotencyStore", "idempotency_key", "idempotent"]
