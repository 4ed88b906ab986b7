"""SIGINT/SIGTERM handling for a process that runs a :class:`~rpcmesh.host.ServiceHost`.

The first signal asks for a graceful stop. From then on a second signal, or a stop still
running after its deadline, ends the process at once with exit code 128 + the signal number
(SIGALRM's for the deadline), as ``rpcmesh up`` and ``rpcmesh gateway`` do.

The host cannot use ``rpcmesh.cli.signals`` (the CLI sits above the host), and its
:meth:`~rpcmesh.host.ServiceHost.run` is a coroutine that an application may await inside its
own event loop, so this helper works on the running loop instead of owning ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["ShutdownSignals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ShutdownSignals:
    """Handles SIGINT/SIGTERM on the running loop while a server runs.

    Usage::

        async with ShutdownSignals(stop_requested.set, deadline=30, name="echo"):
            await stop_requested.wait()
            await host.stop()

    Leaving the block removes the handlers and disarms the deadline.
    """

    def __init__(self, on_first: Callable[[], None], *, deadline: float, name: str) -> None:
        """Handle the signals.

        Args:
            on_first: Called (on the loop) for the first signal; it should start the stop.
            deadline: Seconds the stop may take after the first signal before the process
                is ended at once.
            name: Prefix of the one line printed on stderr when exiting at once.
        """
        self._on_first = on_first
        self._deadline = deadline
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: threading.Timer | None = None
        self.received: signal.Signals | None = None
        """The first signal received, if any."""

    def _exit_now(self, sig: int, why: str) -> None:
        print(f"{self._name}: {why}; exiting at once", file=sys.stderr, flush=True)
        # Not sys.exit: the loop (or the thread of the deadline) may be stuck in the stop.
        os._exit(128 + sig)

    def _first(self, sig: signal.Signals) -> None:
        assert self._loop is not None
        self.received = sig
        for again in _SIGNALS:
            self._loop.add_signal_handler(again, self._exit_now, again, f"{again.name} during shutdown")
        # A thread, not the loop: it fires even if a shutdown step blocks the loop.
        self._watchdog = threading.Timer(
            self._deadline, self._exit_now, (signal.SIGALRM, f"shutdown took over {self._deadline:g}s")
        )
        self._watchdog.daemon = True
        self._watchdog.start()
        self._on_first()

    async def __aenter__(self) -> ShutdownSignals:
        self._loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            self._loop.add_signal_handler(sig, self._first, sig)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._loop is not None:
            for sig in _SIGNALS:
                self._loop.remove_signal_handler(sig)
            self._loop = None
