"""A saga participant for tests and benchmarks: a real process that registers itself in the Registry.

Serves ``test.v1.Ledger`` methods over ``google.protobuf.StringValue``:
``Do`` applies an effect (idempotent on ``x-idempotency-key`` through
``rpcmesh.saga.idempotent``), ``Undo`` reverts the effect of the same saga
step once (a compensation with nothing to revert records a tombstone, so a
late ``Do`` cannot apply afterwards), ``Fail`` always answers
FAILED_PRECONDITION and ``Flaky`` answers UNAVAILABLE on the first attempt of
each key. ``UndoOnceFixed`` is ``Undo`` that answers FAILED_PRECONDITION while
the file ``<db>.broken`` exists (a broken compensation an operator fixes, then
retries) and takes a second while ``<db>.slow`` exists. Every invocation is
logged in SQLite (``calls``), every effect in ``effects``: the fault test
checks its invariants there. Those tables live in the same file as the
IdempotencyStore's responses and are written through its group commits
(``store.run``, synchronous=FULL), as a real service would.

Run: python participant.py --registry HOST:PORT --service NAME --db PATH
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2, wrappers_pb2
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

from rpcmesh.saga import IdempotencyStore, idempotency_key, idempotent

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY, method TEXT, key TEXT, saga_id TEXT, step TEXT, at REAL, traceparent TEXT,
    correlation_id TEXT, started_by TEXT
);
CREATE TABLE IF NOT EXISTS effects (
    saga_id TEXT, step TEXT, applied INTEGER, undone INTEGER, tombstone INTEGER, PRIMARY KEY (saga_id, step)
);
"""


def _meta(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def create_schema(path: Path) -> None:
    """The participant's tables, in the file its IdempotencyStore also uses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
    finally:
        conn.close()


def log_call(conn: sqlite3.Connection, method: str, meta: dict[str, str]) -> None:
    conn.execute(
        "INSERT INTO calls (method, key, saga_id, step, at, traceparent, correlation_id, started_by) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            method,
            meta.get("x-idempotency-key", ""),
            meta.get("x-saga-id", ""),
            meta.get("x-saga-step", ""),
            time.time(),
            meta.get("traceparent", ""),
            meta.get("x-correlation-id", ""),
            meta.get("x-rpcmesh-saga-started-by", ""),
        ),
    )


def apply_effect(conn: sqlite3.Connection, meta: dict[str, str]) -> bool:
    """Apply the step's effect; False when it was compensated already (tombstone)."""
    saga, step = meta.get("x-saga-id", ""), meta.get("x-saga-step", "")
    query = "SELECT tombstone FROM effects WHERE saga_id = ? AND step = ?"
    row = conn.execute(query, (saga, step)).fetchone()
    if row is not None and row[0]:
        return False
    conn.execute(
        "INSERT INTO effects VALUES (?, ?, 1, 0, 0) ON CONFLICT DO UPDATE SET applied = applied + 1",
        (saga, step),
    )
    return True


def undo_effect(conn: sqlite3.Connection, meta: dict[str, str]) -> str:
    saga, step = meta.get("x-saga-id", ""), meta.get("x-saga-step", "")
    row = conn.execute("SELECT applied FROM effects WHERE saga_id = ? AND step = ?", (saga, step)).fetchone()
    if row is None:
        conn.execute("INSERT INTO effects VALUES (?, ?, 0, 0, 1)", (saga, step))
        return "nothing to undo"
    conn.execute("UPDATE effects SET undone = undone + 1 WHERE saga_id = ? AND step = ?", (saga, step))
    return "undone"


class Ledger:
    def __init__(self, db: Path, name: str) -> None:
        self.name = name
        create_schema(db)
        # One SQLite file (synchronous=FULL): the call log and effects go through the store's
        # group commits (store.run), next to the stored responses.
        self.store = IdempotencyStore(db)
        self.flaky_seen: set[str] = set()
        self.broken = db.with_suffix(".broken")
        self.slow = db.with_suffix(".slow")

    def handlers(self) -> grpc.GenericRpcHandler:
        store = self.store

        async def effect(
            request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext[Any, Any], method: str
        ) -> Any:
            meta = _meta(context)

            def run(conn: sqlite3.Connection) -> bool:
                log_call(conn, method, meta)
                return apply_effect(conn, meta)

            if not await store.run(run):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "already compensated")
            return wrappers_pb2.StringValue(value=f"{self.name}:{request.value}")

        @idempotent(store)
        async def do(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await effect(request, context, "Do")

        async def revert(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            meta = _meta(context)

            def run(conn: sqlite3.Connection) -> str:
                log_call(conn, "Undo", meta)
                return undo_effect(conn, meta)

            return wrappers_pb2.StringValue(value=await store.run(run))

        @idempotent(store)
        async def undo(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await revert(context)

        @idempotent(store)
        async def undo_once_fixed(
            request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            meta = _meta(context)
            if self.broken.exists():
                await store.run(lambda conn: log_call(conn, "UndoBroken", meta))
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "compensation broken")
            if self.slow.exists():
                await asyncio.sleep(1.0)
            return await revert(context)

        async def fail(request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            meta = _meta(context)
            await store.run(lambda conn: log_call(conn, "Fail", meta))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "insufficient funds")

        @idempotent(store)
        async def flaky(
            request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            key = idempotency_key(context)
            if key not in self.flaky_seen:
                self.flaky_seen.add(key)
                meta = _meta(context)
                await store.run(lambda conn: log_call(conn, "Flaky", meta))
                await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return await effect(request, context, "Flaky")

        def unary(fn: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=wrappers_pb2.StringValue.FromString,
                response_serializer=wrappers_pb2.StringValue.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            "test.v1.Ledger",
            {
                "Do": unary(do),
                "Undo": unary(undo),
                "UndoOnceFixed": unary(undo_once_fixed),
                "Fail": unary(fail),
                "Flaky": unary(flaky),
            },
        )


async def keep_registered(registry: str, service: str, address: str) -> None:
    """Register with a lease and heartbeat; register again whenever the Registry lost it."""
    # With RPCMESH_TOKEN set (a control plane with tokens in --insecure development mode) it sends it.
    token = os.environ.get("RPCMESH_TOKEN")
    auth = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(registry) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        lease: registry_pb2.RegisterResponse | None = None
        while True:
            try:
                if lease is None:
                    lease = await stub.Register(
                        registry_pb2.RegisterRequest(
                            instance=registry_pb2.Instance(service=service, address=address),
                            ttl=duration_pb2.Duration(seconds=60),
                        ),
                        timeout=2.0,
                        metadata=auth,
                    )
                    print(f"registered {service} at {address}", flush=True)
                else:
                    await stub.Heartbeat(
                        registry_pb2.HeartbeatRequest(lease_id=lease.lease_id, lease_token=lease.lease_token),
                        timeout=2.0,
                        metadata=auth,
                    )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    lease = None
            await asyncio.sleep(0.5 if lease is None else 2.0)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--db", type=Path, required=True)
    args = parser.parse_args()
    ledger = Ledger(args.db, args.service)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ledger.handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    task = asyncio.create_task(keep_registered(args.registry, args.service, address))
    print(f"participant {args.service} listening on {address}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


if __name__ == "__main__":
    asyncio.run(main())
