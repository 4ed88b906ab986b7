"""Make a Python participant's handler idempotent on the saga's ``x-idempotency-key``.

The SagaCoordinator may call a step or compensation more than once with the
same key (a retry after a timeout, a re-invocation after a coordinator crash).
Wrap the handler and the first successful response for a key is stored in
SQLite; later calls with that key get the stored response without running the
handler again. Once started for a key, the handler runs to completion and
its response is recorded even when the caller goes away (a coordinator killed
mid-call cancels the call): an effect already applied must not lose its record.
The handler's effect and the record are two writes, not one transaction: a
participant process that dies between them runs the handler again on the
re-invocation, so effects should also be idempotent on the key where that
matters. Failed calls are not stored (they are
expected to have had no effect), so a retry runs the handler again.

Usage::

    store = IdempotencyStore(Path("payments-idem.db"))

    class Payments(payments_pb2_grpc.PaymentsServicer):
        @idempotent(store)
        async def Charge(self, request, context): ...
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from rpcmesh.tasks import start_supervised

IDEMPOTENCY_KEY = "x-idempotency-key"

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])
_T = TypeVar("_T")


class IdempotencyStore:
    """Key -> stored response, in one SQLite file (WAL, synchronous=FULL).

    Writes run in order on one thread. Operations that queue up while a
    transaction is being committed are run together in the next one (group
    commit): concurrent calls share one fsync instead of one each. Lookups
    (:meth:`get`) read the last committed state through a second connection on
    the caller's thread: a primary-key read in WAL mode never waits for the
    writer, and costs less than a hop to the writer thread.

    A participant can keep its own records in the same file and the same
    group commits with :meth:`run` (its tables next to ``responses``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idempotency")
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, type TEXT NOT NULL, "
            "body BLOB NOT NULL, stored_at REAL NOT NULL)"
        )
        # Lookups: committed state only (WAL readers never block on the writer).
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA busy_timeout=5000")
        self._locks: dict[str, asyncio.Lock] = {}
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        """Serialises concurrent calls with the same key in this process."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]  # no one else holds or waits for it

    async def run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``operation(connection)`` in the writer's next transaction; its result once committed.

        For a participant's own records in this file: they share group commits
        with the stored responses. The operation runs on the writer thread and
        runs (and commits) even if the caller is cancelled; a ``sqlite3.Error``
        it raises fails only this operation.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.append((operation, future))
        if self._writer is None:
            self._wake = asyncio.Event()
            # Supervised: were the loop ever to fail, every later run() would wait forever.
            self._writer = start_supervised(self._write_loop, name="idempotency-writer")
        assert self._wake is not None
        self._wake.set()
        return await future

    async def _write_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    outcomes = await loop.run_in_executor(self._executor, self._transaction, batch)
                except Exception as exc:  # the commit failed: so did every operation in it
                    outcomes = [(False, exc)] * len(batch)
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)

    def _transaction(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Any]]) -> list[Any]:
        outcomes: list[tuple[bool, Any]] = []
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for operation, _ in batch:
                try:
                    outcomes.append((True, operation(self._conn)))
                except sqlite3.Error as exc:
                    outcomes.append((False, exc))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return outcomes

    async def get(self, key: str) -> Message | None:
        """The stored response for ``key``, if any (as last committed)."""
        row = self._reader.execute("SELECT type, body FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        descriptor = descriptor_pool.Default().FindMessageTypeByName(row[0])
        message: Message = message_factory.GetMessageClass(descriptor).FromString(bytes(row[1]))
        return message

    async def put(self, key: str, response: Message) -> None:
        """Store the response of ``key`` (the first one stored wins)."""
        name = response.DESCRIPTOR.full_name
        body = response.SerializeToString()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?)", (key, name, body, time.time())
            )

        await self.run(run)

    async def count(self) -> int:
        """How many keys are stored."""

        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

        return await self.run(run)

    def close(self) -> None:
        """Stop the writer and close the file (operations still queued fail)."""
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        for _, future in self._queue:
            if not future.done():
                future.set_exception(RuntimeError("idempotency store closed"))
        self._queue.clear()
        self._executor.shutdown(wait=True)
        self._reader.close()
        self._conn.close()


def idempotency_key(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The call's ``x-idempotency-key`` ("" when absent)."""
    for key, value in context.invocation_metadata() or ():
        if key == IDEMPOTENCY_KEY and isinstance(value, str):
            return value
    return ""


async def _run_to_completion(store: IdempotencyStore, key: str, call: Awaitable[Any]) -> Any:
    """Run the handler and record its response even if the caller goes away meanwhile.

    A coordinator killed mid-call cancels the handler's task; an effect applied
    before that point must still get its record, or the re-invocation with the
    same key would apply it again. So the handler and the write run in their
    own task, and the key's lock is held until both are done.
    """

    async def run() -> Any:
        response = await call
        if isinstance(response, Message):
            await store.put(key, response)
        return response

    task = asyncio.ensure_future(run())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


def idempotent(store: IdempotencyStore) -> Callable[[_Handler], _Handler]:
    """Decorate a grpc.aio unary handler (method or function) to replay stored responses by key."""

    def decorate(handler: _Handler) -> _Handler:
        @functools.wraps(handler)
        async def wrapper(*args: Any) -> Any:
            context: grpc.aio.ServicerContext[Any, Any] = args[-1]
            key = idempotency_key(context)
            if not key:
                return await handler(*args)
            async with store.lock(key):
                stored = await store.get(key)
                if stored is not None:
                    return stored
                return await _run_to_completion(store, key, handler(*args))

        return wrapper  # type: ignore[return-value]

    return decorate
