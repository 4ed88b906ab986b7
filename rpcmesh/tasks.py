"""Owning background asyncio tasks: supervising them while they run, and stopping them for sure.

On Python 3.11, ``asyncio.wait_for`` can lose a cancellation that arrives just as its inner
future completes (CPython gh-86296, fixed in 3.12), and nats-py's request path (every
JetStream API call) runs through it. A periodic loop cancelled at that moment carries on as
if nothing happened, and a shutdown that cancels it once and awaits it waits forever.
``stop_tasks`` cancels, waits briefly, and cancels again until every task has ended.

``run_supervised``/``start_supervised`` keep a long-lived loop alive: a run that raises is logged
at ERROR and restarted with backoff, never left dead.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

RECANCEL_INTERVAL_S = 0.5
"""How long ``stop_tasks`` waits for cancelled tasks before cancelling the survivors again."""


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and return once every one has ended.

    A task that had already failed is logged (debug) rather than raised: shutdown goes on. The
    calling task itself is skipped (a task cannot wait for itself). If the caller is cancelled
    while waiting, the cancellation propagates as usual.
    """
    current = asyncio.current_task()
    owned = [task for task in tasks if task is not current]
    pending = {task for task in owned if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_INTERVAL_S)
    for task in owned:
        if not task.cancelled() and task.exception() is not None:
            logger.debug("task %s had failed", task.get_name(), exc_info=task.exception())


SupervisedFactory = Callable[[], Awaitable[None]]
"""Makes a fresh run of a supervised long-lived coroutine (called again after each failure)."""


async def run_supervised(
    factory: SupervisedFactory,
    *,
    name: str,
    initial_delay: float = 0.1,
    max_delay: float = 5.0,
    healthy_after: float = 10.0,
    rand: Callable[[], float] = random.random,
) -> None:
    """Run ``factory()`` until it returns; restart it with backoff whenever it raises.

    The supervision every long-lived task gets: a run that ends with an exception (anything but
    a cancellation) is logged at ERROR with its traceback and started again after a delay that
    doubles from ``initial_delay`` up to ``max_delay`` (with +-20 % jitter), so a bug or an
    unexpected library error can never leave the task dead and the process silently degraded. A
    run that lasted at least ``healthy_after`` seconds resets the delay. A normal return ends
    supervision; cancellation propagates as usual.
    """
    if initial_delay <= 0 or max_delay < initial_delay:
        raise ValueError("initial_delay: must be > 0 and <= max_delay")
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        started = loop.time()
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if loop.time() - started >= healthy_after:
                failures = 0
            delay = min(initial_delay * 2**failures, max_delay) * (1 + 0.2 * (2 * rand() - 1))
            failures += 1
            logger.exception("task %s failed; restarting it in %.2fs", name, delay)
            await asyncio.sleep(delay)


def start_supervised(
    factory: SupervisedFactory,
    *,
    name: str,
    initial_delay: float = 0.1,
    max_delay: float = 5.0,
    healthy_after: float = 10.0,
) -> asyncio.Task[None]:
    """Start :func:`run_supervised` as a task named ``name`` on the running loop."""
    return asyncio.get_running_loop().create_task(
        run_supervised(
            factory,
            name=name,
            initial_delay=initial_delay,
            max_delay=max_delay,
            healthy_after=healthy_after,
        ),
        name=name,
    )
