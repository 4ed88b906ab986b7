"""The fast paths that rely on private names of OpenTelemetry, probed once at import.

rpcmesh takes two shortcuts through names that OpenTelemetry does not promise to keep. Each is
probed when the module that uses it is imported (and the exporter's stub swap is checked on
every exporter built); when a name is missing or behaves differently, rpcmesh takes the public
path instead and one warning (logger ``rpcmesh.telemetry``) says which shortcut is off and why.
Nothing is lost on the public paths, they only cost more CPU.

=====================  ======================================================  =====================
fast path              private names                                           public fallback
=====================  ======================================================  =====================
``otlp_exporter``      ``exporter.otlp.proto.common._internal`` encoders,      stock ``OTLPSpanExporter``
                       ``OTLPSpanExporter._initialize_channel_and_stub``,      (the SDK's encoder)
                       ``_channel``, ``_client``, ``_export``,
                       ``_translate_data``
``duration_reader``    ``sdk.metrics._internal.instrument._Histogram``,        ``Histogram.record``
                       ``MetricReader._instrument_class_temporality``,
                       ``_instrument_class_aggregation``, ``_collect``
=====================  ======================================================  =====================

Three other shortcuts (``SpanContext`` built as a bare tuple, a ``Context`` built from the API's
private keys, skipping the current-span swap for ``grpc.aio._channel``'s own callables) saved
under 1 % of a traced call's CPU each (``bench/bench_tracing.py --fast-paths``) and were removed;
``InstrumentationScope``s are built publicly instead of read from ``_instrumentation_scope``.

``FAST[name]`` says whether a path is in use; a test or a benchmark may turn one off with
``force_fallback(name)`` before the objects that use it are built (both are chosen in
``setup_telemetry``).
"""

from __future__ import annotations

import logging

_logger = logging.getLogger("rpcmesh.telemetry")

FAST: dict[str, bool] = {}
"""Per fast path: whether it is in use (its probe succeeded and it is not forced off)."""

REASONS: dict[str, str] = {}
"""Per fast path that is off: why."""

PROBED: dict[str, bool] = {}
"""Per fast path: whether its probe (and every later check) found the private names as expected."""

_forced_off: set[str] = set()


def register(name: str, ok: bool, reason: str = "") -> bool:
    """Record a probe (or later check) of fast path ``name``; warn once when it fails. Returns ``ok``."""
    was_ok = PROBED.get(name, True)
    PROBED[name] = was_ok and ok
    FAST[name] = PROBED[name] and name not in _forced_off
    if was_ok and not ok:
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
    """Turn fast path ``name`` off, or back on (``fast=True``) if its probe succeeded (tests, benches).

    May come before the probe (the module that uses the path not imported yet): the probe then
    still runs, and the path stays off until turned back on.
    """
    if fast:
        _forced_off.discard(name)
    else:
        _forced_off.add(name)
    if name in PROBED:
        FAST[name] = PROBED[name] and name not in _forced_off
