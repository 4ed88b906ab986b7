"""Request-stream replay for retries of client-streaming calls (asyncio and sync)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

__all__ = ["RequestReplay", "SyncRequestReplay"]

_END = object()


def _size(item: Any) -> int:
    """Approximate wire size of a request, for the replay limit."""
    byte_size = getattr(item, "ByteSize", None)
    if callable(byte_size):
        return int(byte_size())
    if isinstance(item, bytes | bytearray | memoryview):
        return len(item)
    return 64


class RequestReplay:
    """Feeds the request stream to successive attempts, replaying what earlier attempts sent.

    Only the newest attempt pulls from the source. Once more than ``limit_bytes``
    were sent the buffer is dropped and :attr:`overflowed` is set: the call is
    committed and cannot be retried.
    """

    def __init__(self, source: AsyncIterable[Any] | Iterable[Any] | None, limit_bytes: int) -> None:
        self._queue: asyncio.Queue[Any] | None = None
        if source is None:
            self._queue = asyncio.Queue()
            self._async: AsyncIterator[Any] | None = None
            self._sync: Iterator[Any] | None = None
        elif isinstance(source, AsyncIterable):
            self._async = source.__aiter__()
            self._sync = None
        else:
            self._async = None
            self._sync = iter(source)
        self._limit = limit_bytes
        self._buffer: list[Any] = []
        self._size = 0
        self._pending: asyncio.Future[Any] | None = None
        self._finished = False
        self._attempt = 0
        self.overflowed = False

    async def write(self, item: Any) -> None:
        """Queue a request (writer API: ``call.write``)."""
        if self._queue is None:
            raise RuntimeError("write: the call was given a request iterator")
        await self._queue.put(item)

    async def done_writing(self) -> None:
        """End the request stream (writer API)."""
        if self._queue is None:
            raise RuntimeError("done_writing: the call was given a request iterator")
        await self._queue.put(_END)

    async def _pull(self) -> Any:
        if self._queue is not None:
            return await self._queue.get()
        if self._async is not None:
            try:
                return await self._async.__anext__()
            except StopAsyncIteration:
                return _END
        assert self._sync is not None
        return next(self._sync, _END)

    async def _next(self) -> Any:
        if self._finished:
            return _END
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._pull())
        # Shielded: when an attempt is cancelled mid-pull, the pull completes
        # for the next attempt instead of breaking the user's generator.
        item = await asyncio.shield(self._pending)
        self._pending = None
        if item is _END:
            self._finished = True
            return _END
        if not self.overflowed:
            self._size += _size(item)
            if self._size > self._limit:
                self.overflowed = True
                self._buffer.clear()
            else:
                self._buffer.append(item)
        return item

    def attempt(self) -> AsyncIterator[Any]:
        """The request iterator of a new attempt."""
        if self.overflowed:
            raise RuntimeError("the request stream outgrew its replay buffer")
        self._attempt += 1
        return self._feed(self._attempt, list(self._buffer))

    async def _feed(self, attempt: int, replay: list[Any]) -> AsyncIterator[Any]:
        for item in replay:
            yield item
        while attempt == self._attempt:
            item = await self._next()
            if item is _END:
                return
            yield item

    def close(self) -> None:
        """Drop a pending pull (the call is over)."""
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None


class SyncRequestReplay:
    """The sync shell's :class:`RequestReplay`: feeds successive attempts from one iterator."""

    def __init__(self, source: Iterable[Any], limit_bytes: int) -> None:
        self._source = iter(source)
        self._buffer: list[Any] = []
        self._size = 0
        self._limit = limit_bytes
        self._lock = threading.Lock()
        self._attempt = 0
        self.overflowed = False

    def attempt(self) -> Iterator[Any]:
        """The request iterator of a new attempt (earlier ones stop pulling)."""
        self._attempt += 1
        return self._feed(self._attempt, list(self._buffer))

    def _feed(self, attempt: int, replay: list[Any]) -> Iterator[Any]:
        yield from replay
        while attempt == self._attempt:
            with self._lock:
                item = next(self._source, _END)
                if item is _END:
                    return
                if not self.overflowed:
                    self._size += _size(item)
                    if self._size > self._limit:
                        self.overflowed = True
                        self._buffer.clear()
                    else:
                        self._buffer.append(item)
            yield item
