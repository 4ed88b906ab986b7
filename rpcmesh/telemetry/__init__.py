"""rpcmesh.telemetry: OpenTelemetry traces and metrics, and one correlation id across every hop.

Nothing here reads the environment or builds an SDK object at import. A process turns
telemetry on with ``setup_telemetry(TelemetryConfig.from_env())``; until then every
hook takes its no-op path and only the correlation id travels.

Pieces, and who plugs them in:

- gRPC: ``trace_aio_channel(channel)`` wraps a ``grpc.aio`` (or mesh) channel and
  ``trace_aio_server(server)`` a ``grpc.aio`` server before servicers are added: the cheapest
  paths (no grpc.aio interceptor machinery); ``aio_client_interceptors()`` /
  ``sync_client_interceptors()`` for channels built with interceptors (list them first);
  ``AioServerTracingInterceptor`` / ``SyncServerTracingInterceptor`` for servers (list it before
  ``StatusErrorInterceptor``).
- Client stack: ``record_attempt``, ``attempt_span`` + ``inject_metadata``,
  ``record_breaker_rejection``, ``record_breaker_transition``.
- Bus: ``producer_span`` / ``inject_message_headers`` when publishing, ``consumer_span`` /
  ``extract_message_context`` when delivering, ``record_dead_letter``.
- Sagas: ``capture_trace_context()`` at start, ``use_trace_context(stored)`` around each step.
- Per-call spans of one's own (e.g. a mesh call around its attempts): ``start_call_span`` (the
  cheap path the interceptors use; ``telemetry.tracer`` is the SDK's, fine for rare spans).
- Metrics: ``get_telemetry().metrics`` (``MeshMetrics``).
- Handlers and logs: ``correlation_id()``, ``install_log_correlation()``.
"""

from rpcmesh.telemetry._calls import start_call_span
from rpcmesh.telemetry.aio_channel import TracedUnaryCall, TracingChannel, trace_aio_channel
from rpcmesh.telemetry.aio_server import TracingServer, trace_aio_server
from rpcmesh.telemetry.attempts import (
    attempt_span,
    record_attempt,
    record_breaker_rejection,
    record_breaker_transition,
)
from rpcmesh.telemetry.config import TelemetryConfig, TelemetryConfigError
from rpcmesh.telemetry.correlation import (
    CORRELATION_ATTRIBUTE,
    CORRELATION_BAGGAGE_KEY,
    CORRELATION_METADATA_KEY,
    CorrelationIdFilter,
    correlation_id,
    install_log_correlation,
    new_correlation_id,
    use_correlation_id,
)
from rpcmesh.telemetry.grpc_aio import (
    AioServerTracingInterceptor,
    StreamStreamTracingInterceptor,
    StreamUnaryTracingInterceptor,
    UnaryStreamTracingInterceptor,
    UnaryUnaryTracingInterceptor,
    aio_client_interceptors,
)
from rpcmesh.telemetry.grpc_sync import (
    SyncClientTracingInterceptor,
    SyncServerTracingInterceptor,
    sync_client_interceptors,
)
from rpcmesh.telemetry.messaging import (
    MessageContext,
    capture_trace_context,
    consumer_span,
    extract_message_context,
    inject_message_headers,
    producer_span,
    record_dead_letter,
    use_trace_context,
)
from rpcmesh.telemetry.metrics import MeshMetrics, OtelMeshMetrics
from rpcmesh.telemetry.propagation import inject_metadata
from rpcmesh.telemetry.setup import DISABLED, Telemetry, get_telemetry, install_telemetry, setup_telemetry

__all__ = [
    "CORRELATION_ATTRIBUTE",
    "CORRELATION_BAGGAGE_KEY",
    "CORRELATION_METADATA_KEY",
    "DISABLED",
    "AioServerTracingInterceptor",
    "CorrelationIdFilter",
    "MeshMetrics",
    "MessageContext",
    "OtelMeshMetrics",
    "StreamStreamTracingInterceptor",
    "StreamUnaryTracingInterceptor",
    "SyncClientTracingInterceptor",
    "SyncServerTracingInterceptor",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "TracedUnaryCall",
    "TracingChannel",
    "TracingServer",
    "UnaryStreamTracingInterceptor",
    "UnaryUnaryTracingInterceptor",
    "aio_client_interceptors",
    "attempt_span",
    "capture_trace_context",
    "consumer_span",
    "correlation_id",
    "extract_message_context",
    "get_telemetry",
    "inject_message_headers",
    "inject_metadata",
    "install_log_correlation",
    "install_telemetry",
    "new_correlation_id",
    "producer_span",
    "record_attempt",
    "record_breaker_rejection",
    "record_breaker_transition",
    "record_dead_letter",
    "setup_telemetry",
    "start_call_span",
    "sync_client_interceptors",
    "trace_aio_channel",
    "trace_aio_server",
    "use_correlation_id",
    "use_trace_context",
]
