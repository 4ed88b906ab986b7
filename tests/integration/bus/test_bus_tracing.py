"""One trace from a publisher process through the Bus to a subscriber process, on both backends.

Every process exports OTLP to a real collector started by the test. The
publisher's PRODUCER span is the parent of every CONSUMER span of its message
(first delivery, the redelivery after a nak, and a terminated message's), all
carry the correlation id, the handler sees it as ``correlation_id()``, and the
Bus exports its publish/deliver/redeliver/dead-letter counters.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import backends
from tests.support.otlp_collector import CollectedSpan, OtlpCollector, running_collector
from tests.support.processes import ManagedProcess, python_env, start_control_plane

pytestmark = [pytest.mark.slow]


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    with running_collector() as started:
        yield started


def otel_env(collector: OtlpCollector, service: str) -> dict[str, str]:
    return python_env(
        {
            "OTEL_SERVICE_NAME": service,
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
        }
    )


def worker(env: dict[str, str], *args: str) -> ManagedProcess:
    return ManagedProcess([sys.executable, "-m", "tests.integration.bus.workers", *args], env=env)


@pytest.mark.parametrize("backend", ["sqlite", "nats"])
async def test_trace_and_correlation_id_cross_the_bus(
    tmp_path: Path,
    collector: OtlpCollector,
    prefix: str,
    backend: str,
) -> None:
    extra = ("--bus", backends.nats_url()) if backend == "nats" else ()
    topic = f"{prefix}.orders"
    correlation = f"corr-{uuid.uuid4().hex[:8]}"
    outfile = tmp_path / "handled.txt"
    procs: list[ManagedProcess] = []
    try:
        bus, address = start_control_plane(tmp_path / "data", *extra, env=otel_env(collector, "bus"))
        procs.append(bus)
        subscriber = worker(
            otel_env(collector, "subscriber"), "traced-subscribe", address, topic, "g", str(outfile)
        )
        procs.append(subscriber)
        subscriber.wait_for_line("ready", timeout=30)
        publisher = worker(
            otel_env(collector, "publisher"),
            "traced-publish",
            address,
            topic,
            correlation,
            "ok",
            "fail",
            "dead",
        )
        procs.append(publisher)
        publisher.wait_for_line("published", timeout=30)

        def complete(spans: list[CollectedSpan]) -> bool:
            ours = [s for s in spans if s.attributes.get("rpcmesh.correlation_id") == correlation]
            producers = [s for s in ours if s.kind == "PRODUCER" and s.service == "publisher"]
            consumers = [s for s in ours if s.kind == "CONSUMER" and s.service == "subscriber"]
            return len(producers) == 3 and len(consumers) == 4

        spans = await asyncio.to_thread(collector.wait_for_spans, complete, 60)
        metrics = {
            name: await asyncio.to_thread(collector.wait_for_metric, "bus", name, 30)
            for name in (
                "rpcmesh.bus.published",
                "rpcmesh.bus.delivered",
                "rpcmesh.bus.redelivered",
                "rpcmesh.bus.dead_lettered",
                "rpcmesh.bus.consumer_lag",
            )
        }
    finally:
        for proc in reversed(procs):
            proc.kill()

    ours = [s for s in spans if s.attributes.get("rpcmesh.correlation_id") == correlation]
    producers = {s.span_id: s for s in ours if s.kind == "PRODUCER" and s.service == "publisher"}
    consumers = [s for s in ours if s.kind == "CONSUMER" and s.service == "subscriber"]
    for producer in producers.values():
        assert producer.name == f"publish {topic}"
        assert producer.attributes["messaging.destination.name"] == topic
    by_attempt: dict[tuple[str, int], CollectedSpan] = {}
    for consumer in consumers:
        parent = producers[consumer.parent_span_id or ""]  # the publisher's span is the parent
        assert consumer.trace_id == parent.trace_id
        assert consumer.name == f"process {topic}"
        assert consumer.attributes["messaging.destination.name"] == topic
        assert consumer.attributes["messaging.consumer.group.name"] == "g"
        assert consumer.attributes["messaging.message.id"]
        attempt = int(consumer.attributes["messaging.rpcmesh.delivery_attempt"])
        by_attempt[(parent.span_id, attempt)] = consumer
    assert len(by_attempt) == 4 and sorted(a for _, a in by_attempt) == [1, 1, 1, 2]
    assert len({s.trace_id for s in producers.values()}) == 3  # one trace per published message
    failed = [s for s in consumers if s.status_code == 2]  # ERROR: the nak and the termination
    assert len(failed) == 2
    assert sum("rpcmesh.dead_letter" in s.events for s in consumers) == 1

    handled = [line.split() for line in outfile.read_text().splitlines()]
    assert sorted((p, int(a)) for p, a, _ in handled) == [("dead", 1), ("fail", 1), ("fail", 2), ("ok", 1)]
    assert {c for _, _, c in handled} == {correlation}
    groups = {point.get("messaging.consumer.group.name") for point in metrics["rpcmesh.bus.delivered"].points}
    assert "g" in groups
