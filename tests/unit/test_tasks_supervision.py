"""run_supervised: a failing run is logged at ERROR and restarted; a normal return or a cancel ends it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from rpcmesh.tasks import run_supervised, start_supervised, stop_tasks


async def test_a_failing_run_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise asyncio.InvalidStateError("RPC already finished.")

    with caplog.at_level(logging.ERROR, logger="rpcmesh.tasks"):
        await asyncio.wait_for(run_supervised(flaky, name="flaky", initial_delay=0.01, max_delay=0.02), 5)
    assert runs == 3
    failures = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(failures) == 2
    assert "flaky" in failures[0].getMessage()
    assert failures[0].exc_info is not None


async def test_cancel_ends_supervision() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = start_supervised(forever, name="forever")
    await started.wait()
    await stop_tasks([task])
    assert task.cancelled()


async def test_bad_delays_are_refused() -> None:
    async def noop() -> None:
        return None

    with pytest.raises(ValueError, match="initial_delay"):
        await run_supervised(noop, name="x", initial_delay=0)
