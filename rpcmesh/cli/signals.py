"""Running `rpcmesh up` and `rpcmesh gateway` until SIGINT/SIGTERM, with a bounded shutdown.

The first signal cancels the server coroutine, whose ``finally`` shuts the server down in
order. A second signal, or a shutdown still running after its deadline, ends the process at
once with exit code 128 + the signal number (SIGALRM's for the deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Coroutine


def run_until_signalled(main: Coroutine[object, object, None], *, deadline: float) -> None:
    """Run a server coroutine until SIGINT/SIGTERM; then let it shut down, for at most ``deadline`` s.

    The first signal cancels ``main`` (its ``finally`` stops the server in order). A second
    signal, or a shutdown still running after ``deadline`` seconds, ends the process at once.
    """
    asyncio.run(_serve_until_signalled(main, deadline))


async def _serve_until_signalled(main: Coroutine[object, object, None], deadline: float) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def exit_now(sig: int, why: str) -> None:
        print(f"rpcmesh: {why}; exiting at once", file=sys.stderr, flush=True)
        os._exit(128 + sig)

    def first_signal(sig: int) -> None:
        for again in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(again, exit_now, again, f"{signal.Signals(again).name} during shutdown")
        # A thread, not the loop: it fires even if some shutdown step blocks the loop.
        watchdog = threading.Timer(deadline, exit_now, (signal.SIGALRM, f"shutdown took over {deadline:g}s"))
        watchdog.daemon = True
        watchdog.start()
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first_signal, sig)
    with contextlib.suppress(asyncio.CancelledError):
        await main
