"""Helpers for saga participants: idempotent handlers keyed by ``x-idempotency-key``."""

from rpcmesh.saga.idempotency import IDEMPOTENCY_KEY, IdempotencyStore, idempotency_key, idempotent

__all__ = ["IDEMPOTENCY_KEY", "IdempotencyStore", "idempotency_key", "idempotent"]
