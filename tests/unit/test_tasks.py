"""stop_tasks ends background tasks even when one swallows its cancellation (Python 3.11 wait_for)."""

from __future__ import annotations

import asyncio

import pytest

from rpcmesh.tasks import stop_tasks


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn_loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if swallowed == 0:  # what a lost cancellation looks like to the loop
                    swallowed += 1
                    continue
                raise

    task = asyncio.create_task(stubborn_loop())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stop_tasks([task]), timeout=5)
    assert task.cancelled() and swallowed == 1


async def test_finished_failed_and_running_tasks_all_end_quietly() -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    async def run_forever() -> None:
        await asyncio.Event().wait()

    done = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(fail())
    running = asyncio.create_task(run_forever())
    await asyncio.sleep(0.01)
    await stop_tasks([done, failed, running])
    assert done.done() and not done.cancelled()
    assert isinstance(failed.exception(), RuntimeError)
    assert running.cancelled()


async def test_the_calling_task_is_skipped() -> None:
    async def stop_myself_and_other(other: asyncio.Task[None]) -> str:
        me = asyncio.current_task()
        assert me is not None
        await stop_tasks([me, other])
        return "still running"

    other = asyncio.create_task(asyncio.Event().wait())  # type: ignore[arg-type]
    assert await stop_myself_and_other(other) == "still running"
    assert other.cancelled()


async def test_an_empty_list_returns_at_once() -> None:
    await asyncio.wait_for(stop_tasks([]), timeout=1)


def test_a_loop_with_a_lost_cancellation_would_hang_without_it() -> None:
    """The failure stop_tasks exists for: one cancel, then awaiting, never ends."""

    async def scenario() -> None:
        async def stubborn_loop() -> None:
            lost = False
            while True:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    if not lost:
                        lost = True
                        continue
                    raise

        task = asyncio.create_task(stubborn_loop())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=0.5)
        await stop_tasks([task])

    asyncio.run(scenario())
