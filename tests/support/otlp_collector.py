"""The OTLP/gRPC receiver the tests use; it lives in :mod:`rpcmesh.testing.otlp`."""

from rpcmesh.testing.otlp import (
    CollectedMetric,
    CollectedSpan,
    OtlpCollector,
    render_trace_tree,
    running_collector,
)

__all__ = ["CollectedMetric", "CollectedSpan", "OtlpCollector", "render_trace_tree", "running_collector"]
