"""A registration the Registry refuses: the reason is logged at ERROR and retries back off."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from rpcmesh.v1 import registry_pb2

from rpcmesh.host import LeaseKeeper
from tests.support.processes import ManagedProcess


def keeper(registry: str) -> LeaseKeeper:
    instance = registry_pb2.Instance(service="dup", instance_id="same", address="127.0.0.1:1")
    return LeaseKeeper(instance, ttl=5, registries=[registry], rpc_timeout=2.0)


@pytest.mark.slow
async def test_a_refused_registration_is_logged_at_error_with_its_reason_and_backed_off(
    control_plane: tuple[ManagedProcess, str], caplog: pytest.LogCaptureFixture
) -> None:
    registry = control_plane[1]
    caplog.set_level(logging.INFO, logger="rpcmesh.host.lease")
    holder, contender = keeper(registry), keeper(registry)
    try:
        assert await holder.start(wait=10)
        # The id is held under another lease token: the Registry answers PERMISSION_DENIED.
        assert not await contender.start(wait=1.5)
        refusals = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.ERROR and "refused the registration" in r.getMessage()
        ]
        # Retried after 1 s, then 2 s (+-20 %): one or two tries in 1.5 s, not one per 0.1-1.7 s.
        assert 1 <= len(refusals) <= 2, refusals
        assert "PERMISSION_DENIED" in refusals[0] and "lease_token" in refusals[0], refusals
        assert contender.refusal.startswith("PERMISSION_DENIED"), contender.refusal
        assert any(
            r.levelno == logging.ERROR and "not registered after 1.5s" in r.getMessage()
            for r in caplog.records
        )
        await holder.stop()  # deregisters: the id is free, the next try succeeds
        deadline = time.monotonic() + 15
        while not contender.registered:
            assert time.monotonic() < deadline, "the contender never registered once the id was free"
            await asyncio.sleep(0.05)
        assert contender.refusal == ""
    finally:
        await holder.stop(deregister=False)
        await contender.stop()
