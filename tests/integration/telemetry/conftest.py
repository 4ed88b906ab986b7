from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.otlp_collector import OtlpCollector, running_collector
from tests.support.processes import ManagedProcess, python_env

RELAY = Path(__file__).with_name("relay_server.py")


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    with running_collector() as started:
        yield started


StartRelay = Callable[..., str]


@pytest.fixture
def start_relay(collector: OtlpCollector) -> Iterator[StartRelay]:
    """Start relay_server.py processes exporting to the collector; returns their address."""
    started: list[ManagedProcess] = []

    def start(name: str, downstream: str = "") -> str:
        env = python_env(
            {
                "OTEL_SERVICE_NAME": name,
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "OTEL_METRIC_EXPORT_INTERVAL": "200",
            }
        )
        args = [sys.executable, str(RELAY), "--name", name]
        if downstream:
            args += ["--downstream", downstream]
        process = ManagedProcess(args, env=env)
        started.append(process)
        return process.wait_for_address(timeout=30)

    try:
        yield start
    finally:
        for process in started:
            process.terminate()
