"""Load a :class:`~rpcmesh.client.policy.MeshPolicy` from YAML or TOML, with errors naming the field.

Sections: ``defaults`` (a service policy for every service, with ``method`` for
every method) and ``services`` (per service, merged over ``defaults``, with
``methods`` per method merged over the service's ``method``). See
:data:`EXAMPLE_YAML`.

Durations are seconds as numbers or strings with a unit (``250ms``, ``5s``, ``1m``).
``retry: null`` (YAML) or ``retry = false`` (TOML) disables retries; likewise breakers.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from rpcmesh.client.policy import (
    BreakerPolicy,
    HedgingPolicy,
    MeshPolicy,
    MethodPolicy,
    PolicyError,
    RetryBudgetPolicy,
    RetryPolicy,
    ServicePolicy,
)

__all__ = ["EXAMPLE_YAML", "load_policy", "parse_policy"]

EXAMPLE_YAML = """\
defaults:
  load_balancing: round_robin
  method:
    timeout: 5s
    retry: {max_attempts: 3, initial_backoff: 50ms, retryable_codes: [UNAVAILABLE]}
  instance_breaker: {consecutive_failures: 5, open_duration: 5s}
services:
  echo:
    method: {idempotent: true}
    methods:
      Echo: {hedging: {max_attempts: 2, delay: 20ms}}
"""
"""A policy file showing every level (TOML takes the same keys)."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_DURATION_FIELDS = {
    "timeout",
    "initial_backoff",
    "max_backoff",
    "delay",
    "slow_call_duration",
    "open_duration",
    "max_probe_hold",
}
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def _duration(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise PolicyError(f"{path}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise PolicyError(f"{path}: expected a duration like 250ms, 5s or 1m, got {value!r}")


def _build(cls: type[Any], raw: Any, path: str, nested: Mapping[str, type[Any]] | None = None) -> Any:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{path}: expected a table/mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise PolicyError(f"{where}: unknown setting (expected one of {', '.join(sorted(known))})")
        if nested and key in nested:
            kwargs[key] = None if value is None or value is False else _build(nested[key], value, where)
        elif key in _DURATION_FIELDS:
            kwargs[key] = None if value is None else _duration(value, where)
        elif key in ("retryable_codes", "non_fatal_codes", "failure_codes"):
            if not isinstance(value, list):
                raise PolicyError(f"{where}: expected a list of status codes")
            kwargs[key] = value
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except PolicyError as exc:
        raise PolicyError(f"{path}.{exc}" if path else str(exc)) from None
    except TypeError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _method(raw: Any, path: str) -> MethodPolicy:
    return _build(MethodPolicy, raw, path, {"retry": RetryPolicy, "hedging": HedgingPolicy})  # type: ignore[no-any-return]


def _service(raw: Any, path: str) -> ServicePolicy:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{path}: expected a table/mapping")
    raw = dict(raw)
    method_raw = raw.pop("method", {}) or {}
    methods_raw = raw.pop("methods", {}) or {}
    if not isinstance(methods_raw, Mapping):
        raise PolicyError(f"{path}.methods: expected a table/mapping of method name to policy")
    if not isinstance(method_raw, Mapping):
        raise PolicyError(f"{path}.method: expected a table/mapping")
    policy: ServicePolicy = _build(
        ServicePolicy,
        raw,
        path,
        {
            "instance_breaker": BreakerPolicy,
            "service_breaker": BreakerPolicy,
            "retry_budget": RetryBudgetPolicy,
        },
    )
    method = _method(method_raw, f"{path}.method")
    methods = {
        str(name): _method(
            _merge(method_raw, value) if isinstance(value, Mapping) else value, f"{path}.methods.{name}"
        )
        for name, value in methods_raw.items()
    }
    return ServicePolicy(
        **{
            **{f.name: getattr(policy, f.name) for f in fields(ServicePolicy)},
            "method": method,
            "methods": methods,
        }
    )


def parse_policy(raw: Any) -> MeshPolicy:
    """Build a MeshPolicy from parsed YAML/TOML data."""
    if raw is None:
        return MeshPolicy()
    if not isinstance(raw, Mapping):
        raise PolicyError("policy: expected a mapping with 'defaults' and/or 'services'")
    unknown = set(raw) - {"defaults", "services"}
    if unknown:
        raise PolicyError(f"{sorted(unknown)[0]}: unknown section (expected 'defaults' or 'services')")
    defaults = raw.get("defaults") or {}
    services = raw.get("services") or {}
    if not isinstance(defaults, Mapping):
        raise PolicyError("defaults: expected a table/mapping")
    if not isinstance(services, Mapping):
        raise PolicyError("services: expected a table/mapping of service name to policy")
    return MeshPolicy(
        default=_service(defaults, "defaults"),
        services={
            str(name): _service(
                _merge(defaults, value) if isinstance(value, Mapping) else value, f"services.{name}"
            )
            for name, value in services.items()
        },
    )


def load_policy(path: str | Path) -> MeshPolicy:
    """Load a MeshPolicy from a ``.yaml``/``.yml`` or ``.toml`` file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            raw: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        else:
            raise PolicyError(f"{path}: expected a .yaml, .yml or .toml file")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: cannot parse: {exc}") from None
    return parse_policy(raw)
