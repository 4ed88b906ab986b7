from __future__ import annotations

import asyncio
import logging

import pytest

from rpcmesh.telemetry import (
    CorrelationIdFilter,
    correlation_id,
    install_log_correlation,
    new_correlation_id,
    use_correlation_id,
)
from rpcmesh.telemetry.correlation import (
    choose_correlation_id,
    is_valid_correlation_id,
    uninstall_log_correlation,
)


def test_no_id_outside_a_request() -> None:
    assert correlation_id() is None


def test_use_correlation_id_creates_keeps_and_restores() -> None:
    with use_correlation_id() as outer:
        assert correlation_id() == outer
        assert len(outer) == 32
        with use_correlation_id() as inner:
            assert inner == outer  # an existing id is kept
        with use_correlation_id("given-1") as given:
            assert given == "given-1" == correlation_id()
        assert correlation_id() == outer
    assert correlation_id() is None


async def test_each_task_sees_its_own_id() -> None:
    async def handler(value: str) -> str | None:
        with use_correlation_id(value):
            await asyncio.sleep(0.01)
            return correlation_id()

    results = await asyncio.gather(*(handler(f"id-{i}") for i in range(5)))
    assert results == [f"id-{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("abc-123", True),
        ("0af7651916cd43dd8448eb211c80319c", True),
        ("req:42/a=b@x.y", True),
        ("", False),
        ("has space", False),
        ("semi;colon", False),
        ("comma,list", False),
        ("x" * 128, True),
        ("x" * 129, False),
        ("-leading-dash", False),
        ("ünïcode", False),
    ],
)
def test_incoming_ids_are_validated(value: str, valid: bool) -> None:
    assert is_valid_correlation_id(value) is valid


def test_choose_prefers_first_valid_candidate_else_new() -> None:
    assert choose_correlation_id("from-metadata", "from-baggage") == "from-metadata"
    assert choose_correlation_id("bad value", "from-baggage") == "from-baggage"
    assert choose_correlation_id(None, None) != choose_correlation_id(None, None)
    assert len(new_correlation_id()) == 32


def test_log_records_of_child_loggers_carry_the_id(caplog: pytest.LogCaptureFixture) -> None:
    install_log_correlation()
    install_log_correlation()  # idempotent
    try:
        with caplog.at_level(logging.INFO, logger="rpcmesh"):
            with use_correlation_id("log-test-id"):
                logging.getLogger("rpcmesh.client.retry").info("retrying")
            logging.getLogger("rpcmesh").info("outside")
        by_message = {r.getMessage(): r for r in caplog.records}
        assert by_message["retrying"].correlation_id == "log-test-id"  # type: ignore[attr-defined]
        assert by_message["outside"].correlation_id == "-"  # type: ignore[attr-defined]
        assert logging.getLogger("rpcmesh").filters.count(logging.getLogger("rpcmesh").filters[0]) == 1
    finally:
        uninstall_log_correlation()


def test_filter_alone_annotates_and_never_drops() -> None:
    record = logging.LogRecord("rpcmesh", logging.INFO, __file__, 1, "m", None, None)
    with use_correlation_id("f-1"):
        assert CorrelationIdFilter().filter(record)
    assert record.correlation_id == "f-1"  # type: ignore[attr-defined]
    assert record.trace_id == "-"  # type: ignore[attr-defined]
