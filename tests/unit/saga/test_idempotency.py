"""rpcmesh.saga.idempotent: one handler run per key, even when the caller goes away mid-call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from google.protobuf import wrappers_pb2

from rpcmesh.saga import IdempotencyStore, idempotent


class Context:
    """The part of grpc.aio.ServicerContext the helper reads."""

    def __init__(self, key: str) -> None:
        self.key = key

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-idempotency-key", self.key),)


async def test_response_is_recorded_even_if_the_call_is_cancelled(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path / "idem.db")
    runs: list[str] = []
    busy: list[Any] = []
    ran = asyncio.Event()

    @idempotent(store)
    async def handler(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
        runs.append(request.value)
        ran.set()
        # Keep the store's writer busy so the record is still queued when the caller goes away.
        busy.append(store._executor.submit(time.sleep, 0.3))
        return wrappers_pb2.StringValue(value=f"done {request.value}")

    try:
        call = asyncio.create_task(handler(wrappers_pb2.StringValue(value="a"), Context("k")))
        await ran.wait()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        busy[0].result()
        again = await handler(wrappers_pb2.StringValue(value="a"), Context("k"))
        assert again.value == "done a" and runs == ["a"]
        assert await store.count() == 1
    finally:
        store.close()


async def test_run_shares_the_store_file_and_lookups_see_committed_records(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path / "idem.db")
    try:
        await store.run(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT)"))
        calls: list[str] = []

        @idempotent(store)
        async def handler(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
            await store.run(lambda conn: conn.execute("INSERT INTO calls VALUES (?)", (request.value,)))
            calls.append(request.value)
            return wrappers_pb2.StringValue(value=f"done {request.value}")

        first = await handler(wrappers_pb2.StringValue(value="a"), Context("k"))
        assert await store.get("k") == first  # read back through the lookup connection
        again = await handler(wrappers_pb2.StringValue(value="a"), Context("k"))
        assert again == first and calls == ["a"]
        rows = await store.run(lambda conn: conn.execute("SELECT key FROM calls").fetchall())
        assert rows == [("a",)]
    finally:
        store.close()
