"""A TCP relay that can freeze its connections: a server that hangs without closing anything.

A killed server resets its connections and every client notices at once; a frozen one (SIGSTOP, a
blackholed route, a stuck VM) keeps them open and answers nothing, which only timeouts and pings
find. :class:`FreezableProxy` relays 127.0.0.1:<free port> to a real server; :meth:`freeze` stops
relaying in both directions while the sockets stay open, :meth:`thaw` resumes.
:meth:`freeze_on` freezes at an exact point of a protocol: when the client sends given bytes, before
they reach the server.
"""

from __future__ import annotations

import asyncio
import contextlib


class FreezableProxy:
    """Relays local connections to ``target_host:target_port``; see the module docstring."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self.open_connections = 0
        """Connections relayed now (a client's close is seen even while frozen)."""
        self._server: asyncio.Server | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._trigger: bytes | None = None
        self.triggered = asyncio.Event()
        """Set when :meth:`freeze_on`'s bytes came and the relay froze."""

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>`` (the relay is protocol-blind; NATS is what the tests put behind it)."""
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        """Stop relaying; connections stay open (bytes wait in the kernel's buffers)."""
        self._running.clear()

    def thaw(self) -> None:
        self._running.set()

    def freeze_on(self, pattern: bytes) -> None:
        """Freeze when a client sends ``pattern`` (held, with all after it); then set :attr:`triggered`.

        The pattern is looked for in each chunk read, so it must come in one write (a NATS request does).
        """
        self.triggered.clear()
        self._trigger = pattern

    async def close(self) -> None:
        """Stop accepting and close every relayed connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open_connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.open_connections -= 1
            writer.close()
            return
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, upstream=False)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            self.open_connections -= 1
            for each in (writer, up_writer):
                self._writers.discard(each)
                each.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        """Relay one direction; while frozen, keep reading (so a peer's close is seen) but hold the bytes."""
        held: list[bytes] = []
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                if held and self._running.is_set():
                    writer.write(b"".join(held))
                    held.clear()
                    await writer.drain()
                data = await self._read_or_thaw(reader)
                if data is None:
                    continue
                if not data:
                    return
                if upstream and self._trigger is not None and self._trigger in data:
                    self._trigger = None
                    self.freeze()
                    self.triggered.set()
                held.append(data)

    async def _read_or_thaw(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next bytes (b"" at EOF), or None when a thaw comes first (the held bytes can go out)."""
        if self._running.is_set():
            return await reader.read(65536)
        read = asyncio.ensure_future(reader.read(65536))
        thawed = asyncio.ensure_future(self._running.wait())
        try:
            await asyncio.wait([read, thawed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            thawed.cancel()
        if read.done():
            return read.result()
        read.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await read
        return None
