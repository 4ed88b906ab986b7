"""Stopping background asyncio tasks for sure, even when a library swallowed the cancellation.

On Python 3.11, ``asyncio.wait_for`` can lose a cancellation that arrives just as its inner
future completes (CPython gh-86296, fixed in 3.12), and nats-py's request path (every
JetStream API call) runs through it. A periodic loop cancelled at that moment carries on as
if nothing happened, and a shutdown that cancels it once and awaits it waits forever.
``stop_tasks`` cancels, waits briefly, and cancels again until every task has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
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
