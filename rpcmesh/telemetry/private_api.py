"""The fast paths that rely on private names of OpenTelemetry or grpc, probed once at import.

rpcmesh takes a few shortcuts through names that OpenTelemetry and grpc do not promise to
keep. Each shortcut is probed when the module that uses it is imported; when a name is missing
or behaves differently, that module takes the public path instead and one warning (logger
``rpcmesh.telemetry``) says which shortcut is off and why. Nothing is lost on the public
paths, they only cost more CPU per call or per export.

============================  ===================================================  ==================
fast path                     private names                                        public fallback
============================  ===================================================  ==================
``otlp_exporter``             ``exporter.otlp.proto.common._internal`` encoders,   ``OTLPSpanExporter``
                              ``OTLPSpanExporter._initialize_channel_and_stub``,
                              ``_channel``, ``_client``, ``_export``,
                              ``_translate_data``
``duration_reader``           ``sdk.metrics._internal.instrument._Histogram``,     ``Histogram.record``
                              ``MetricReader._instrument_class_temporality``,
                              ``_instrument_class_aggregation``, ``_collect``
``span_context_tuple``        ``SpanContext``'s tuple layout                       ``SpanContext(...)``
``context_keys``              ``Context``'s keys for the span and the baggage      ``set_span_in_context``
``aio_plain_callable``        ``grpc.aio._channel``'s multicallables and their     span made current
                              ``_interceptors``                                    around every call
============================  ===================================================  ==================

``FAST`` holds the probe results (``FAST[name]``); a test or a benchmark may turn a fast path
off with ``force_fallback(name)`` before the objects that use it are built (the exporter and the
duration histograms are chosen in ``setup_telemetry``; the other three are read per call).
"""

from __future__ import annotations

import logging

_logger = logging.getLogger("rpcmesh.telemetry")

FAST: dict[str, bool] = {}
"""Per fast path: whether it is in use (probed at import; False after ``force_fallback``)."""

REASONS: dict[str, str] = {}
"""Per fast path that is off: why."""

PROBED: dict[str, bool] = {}
"""Per fast path: what its probe found (``force_fallback`` never turns on a path whose probe failed)."""


def register(name: str, ok: bool, reason: str = "") -> bool:
    """Record the probe result of fast path ``name``; warn once when it is off. Returns ``ok``."""
    if name in FAST and not FAST[name]:
        return False  # already off (forced, or failed before): keep it off, warn no more
    FAST[name] = ok
    PROBED.setdefault(name, ok)
    if not ok:
        REASONS[name] = reason
        _logger.warning(
            "rpcmesh telemetry: fast path %r is off (%s); using the public OpenTelemetry/grpc API instead",
            name,
            reason,
        )
    return ok


def probe_failed(name: str, error: BaseException) -> bool:
    """``register(name, False, ...)`` for a probe that raised ``error``."""
    return register(name, False, f"{type(error).__name__}: {error}")


def force_fallback(name: str, fast: bool = False) -> None:
    """Turn fast path ``name`` off, or back on (``fast=True``) if its probe succeeded (tests, benches)."""
    fast = fast and PROBED.get(name, False)
    FAST[name] = fast
    if not fast:
        REASONS.setdefault(name, "forced")
    else:
        REASONS.pop(name, None)


def fast(name: str) -> bool:
    """Whether fast path ``name`` is in use (False when never probed)."""
    return FAST.get(name, False)
