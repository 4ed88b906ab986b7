"""A Node.js caller (@grpc/grpc-js) sending a W3C traceparent is continued by the Python server span."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.telemetry.conftest import StartRelay
from tests.support.otlp_collector import OtlpCollector

pytestmark = pytest.mark.slow

PROBE = Path(__file__).resolve().parents[3] / "examples" / "node" / "trace_probe"


@pytest.fixture(scope="module")
def node_probe() -> Path:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js trace probe cannot run")
    if not (PROBE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot install the trace probe's modules")
        # CI starts from a clean clone: install exactly what package-lock.json pins.
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=PROBE, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return PROBE / "probe.js"


@pytest.mark.parametrize("sent_correlation", ["node-corr-1", ""])
def test_node_traceparent_is_continued_by_python_spans(
    node_probe: Path, collector: OtlpCollector, start_relay: StartRelay, sent_correlation: str
) -> None:
    b = start_relay("service-b")
    a = start_relay("service-a", downstream=b)
    result = subprocess.run(
        ["node", str(node_probe), a, sent_correlation], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout.strip().splitlines()[-1])
    trace_id = sent["trace_id"]
    spans = collector.wait_for_spans(
        lambda all_spans: len([s for s in all_spans if s.trace_id == trace_id]) >= 3
    )
    mine = [s for s in spans if s.trace_id == trace_id]
    (a_server,) = [s for s in mine if s.service == "service-a" and s.kind == "SERVER"]
    (a_client,) = [s for s in mine if s.service == "service-a" and s.kind == "CLIENT"]
    (b_server,) = [s for s in mine if s.service == "service-b" and s.kind == "SERVER"]
    assert a_server.parent_span_id == sent["parent_span_id"]
    assert a_client.parent_span_id == a_server.span_id
    assert b_server.parent_span_id == a_client.span_id
    # The correlation id: the Node caller's when it sent one, else made at the first Python hop.
    correlation = sent["reply"]["message"]
    if sent_correlation:
        assert correlation == sent_correlation
    else:
        assert len(correlation) == 32
    assert {s.attributes["rpcmesh.correlation_id"] for s in mine} == {correlation}
