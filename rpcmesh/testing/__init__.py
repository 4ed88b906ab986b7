"""Helpers for testing services on rpcmesh with real components.

* :class:`ManagedProcess` runs a child process in its own process group, learns
  the port it printed and kills it (children included) when done.
* :class:`OtlpCollector` is a real OTLP/gRPC receiver that keeps the spans and
  metrics exporters send it; :func:`render_trace_tree` prints one trace.
"""

from rpcmesh.testing.otlp import (
    CollectedMetric,
    CollectedSpan,
    OtlpCollector,
    render_trace_tree,
    running_collector,
)
from rpcmesh.testing.processes import ADDRESS_PATTERN, ManagedProcess, rpcmesh_command

__all__ = [
    "ADDRESS_PATTERN",
    "CollectedMetric",
    "CollectedSpan",
    "ManagedProcess",
    "OtlpCollector",
    "render_trace_tree",
    "rpcmesh_command",
    "running_collector",
]
