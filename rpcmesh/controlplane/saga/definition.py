"""Saga definitions: validation (pure) and the effective settings of each step.

A definition is refused as a whole with INVALID_ARGUMENT naming the step and
the field, before anything is stored or started.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import duration_pb2

from rpcmesh.controlplane.registry.validation import service_name
from rpcmesh.controlplane.saga.wire import FieldCopy, valid_field_number
from rpcmesh.errors import InvalidArgumentError, invalid_argument
from rpcmesh.v1 import saga_pb2 as pb

MAX_STEPS = 64
MAX_TEMPLATE_BYTES = 256 * 1024
MAX_INPUT_BYTES = 1024 * 1024
MAX_DEFINITION_BYTES = 2 * 1024 * 1024
MAX_MAPPINGS = 64
MAX_ATTEMPTS = 100
MAX_TIMEOUT_SECONDS = 3600.0
MAX_BACKOFF_SECONDS = 600.0
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_STEP_ATTEMPTS = 3
DEFAULT_COMPENSATION_ATTEMPTS = 10
DEFAULT_INITIAL_BACKOFF = 0.2
DEFAULT_MAX_BACKOFF = 5.0
DEFAULT_MULTIPLIER = 2.0
# google.rpc.Code values that no retry can fix.
DEFAULT_NON_RETRYABLE = frozenset({3, 9, 7, 16, 5, 6, 12})
INPUT = "input"

_DEFINITION_NAME = re.compile(r"^[a-z0-9_.-]{1,128}$")
_STEP_NAME = re.compile(r"^[a-z0-9_-]{1,63}$")
_METHOD = re.compile(r"^/([A-Za-z_][A-Za-z0-9_]*\.)*[A-Za-z_][A-Za-z0-9_]*/[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, kw_only=True)
class RetrySettings:
    """A RetryPolicy with defaults filled in."""

    max_attempts: int
    """Attempts including the first."""
    initial_backoff: float
    """Seconds before the second attempt."""
    max_backoff: float
    """Cap of the delay between attempts."""
    multiplier: float
    """Growth of the delay per attempt."""
    non_retryable: frozenset[int]
    """google.rpc.Code values that end the retries at once."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoff: delays must be >= 0 and the multiplier >= 1")

    def backoff(self, failures: int) -> float:
        """Delay after the ``failures``-th failed attempt (1-based)."""
        delay = self.initial_backoff * self.multiplier ** max(failures - 1, 0)
        return float(min(delay, self.max_backoff))

    def retryable(self, code: int) -> bool:
        """Whether a failure with this code may be retried."""
        return code not in self.non_retryable


def _seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def retry_settings(policy: pb.RetryPolicy, default_attempts: int) -> RetrySettings:
    """Effective settings of a (validated) policy."""
    return RetrySettings(
        max_attempts=policy.max_attempts or default_attempts,
        initial_backoff=_seconds(policy.initial_backoff)
        if policy.HasField("initial_backoff")
        else DEFAULT_INITIAL_BACKOFF,
        max_backoff=_seconds(policy.max_backoff) if policy.HasField("max_backoff") else DEFAULT_MAX_BACKOFF,
        multiplier=policy.backoff_multiplier or DEFAULT_MULTIPLIER,
        non_retryable=frozenset(policy.non_retryable_codes) or DEFAULT_NON_RETRYABLE,
    )


def step_timeout(step: pb.SagaStep) -> float:
    """Deadline of each attempt, in seconds."""
    return _seconds(step.timeout) if step.HasField("timeout") else DEFAULT_TIMEOUT_SECONDS


def mappings(template: pb.PayloadTemplate) -> list[FieldCopy]:
    """A template's FieldMappings as plain values."""
    return [FieldCopy(m.source, m.source_field, m.target_field) for m in template.fields]


def _check_duration(field: str, value: duration_pb2.Duration, maximum: float) -> None:
    seconds = _seconds(value)
    if seconds < 0 or value.nanos < 0 or value.nanos >= 1_000_000_000:
        raise invalid_argument(field, "must be a non-negative duration")
    if seconds > maximum:
        raise invalid_argument(field, f"at most {maximum:g} s")


def _check_retry(field: str, step: str, policy: pb.RetryPolicy) -> None:
    if policy.max_attempts > MAX_ATTEMPTS:
        raise invalid_argument(f"{field}.max_attempts", f"step {step!r}: at most {MAX_ATTEMPTS}")
    for name in ("initial_backoff", "max_backoff"):
        if policy.HasField(name):
            _check_duration(f"{field}.{name}", getattr(policy, name), MAX_BACKOFF_SECONDS)
    if policy.backoff_multiplier and not 1.0 <= policy.backoff_multiplier <= 10.0:
        raise invalid_argument(f"{field}.backoff_multiplier", f"step {step!r}: must be between 1 and 10")
    for index, code in enumerate(policy.non_retryable_codes):
        if not 1 <= code <= 16:
            raise invalid_argument(
                f"{field}.non_retryable_codes[{index}]", f"step {step!r}: not a gRPC error code"
            )


def _check_template(field: str, step: str, template: pb.PayloadTemplate, available: Sequence[str]) -> None:
    if len(template.base) > MAX_TEMPLATE_BYTES:
        raise invalid_argument(
            f"{field}.base", f"step {step!r}: payload larger than {MAX_TEMPLATE_BYTES} bytes"
        )
    if len(template.fields) > MAX_MAPPINGS:
        raise invalid_argument(f"{field}.fields", f"step {step!r}: at most {MAX_MAPPINGS} mappings")
    sources = [(f"{field}.base_from", template.base_from)] if template.base_from else []
    sources += [(f"{field}.fields[{i}].source", m.source) for i, m in enumerate(template.fields)]
    for source_field, source in sources:
        if source not in available:
            raise invalid_argument(
                source_field,
                f"step {step!r}: source {source!r} is neither 'input' nor a step that runs before it "
                "(unknown step, or a cycle)",
            )
    for index, mapping in enumerate(template.fields):
        for name in ("source_field", "target_field"):
            if not valid_field_number(getattr(mapping, name)):
                raise invalid_argument(
                    f"{field}.fields[{index}].{name}", f"step {step!r}: not a valid field number"
                )


def validate_definition(definition: pb.SagaDefinition, field: str = "definition") -> None:
    """Refuse a definition that cannot run, naming the step and field.

    Raises:
        InvalidArgumentError: the first problem found.
    """
    if not _DEFINITION_NAME.match(definition.name):
        raise invalid_argument(f"{field}.name", "1-128 of lowercase letters, digits, '_', '.', '-'")
    if definition.version < 0:
        raise invalid_argument(f"{field}.version", "must be >= 0")
    if not definition.steps:
        raise invalid_argument(f"{field}.steps", "a saga needs at least one step")
    if len(definition.steps) > MAX_STEPS:
        raise invalid_argument(f"{field}.steps", f"at most {MAX_STEPS} steps")
    if definition.ByteSize() > MAX_DEFINITION_BYTES:
        raise invalid_argument(field, f"larger than {MAX_DEFINITION_BYTES} bytes")
    seen: list[str] = []
    for index, step in enumerate(definition.steps):
        at = f"{field}.steps[{index}]"
        if not _STEP_NAME.match(step.name):
            raise invalid_argument(f"{at}.name", "1-63 of lowercase letters, digits, '_' and '-'")
        if step.name in seen:
            raise invalid_argument(f"{at}.name", f"step {step.name!r}: duplicate step name")
        if step.name == INPUT:
            raise invalid_argument(f"{at}.name", "'input' is reserved for the saga input")
        try:
            service_name(step.service, f"{at}.service")
        except InvalidArgumentError as exc:
            raise invalid_argument(
                f"{at}.service", f"step {step.name!r}: {exc.message.split(': ', 1)[-1]}"
            ) from exc
        if not _METHOD.match(step.method):
            raise invalid_argument(f"{at}.method", f"step {step.name!r}: expected '/package.Service/Method'")
        if step.no_compensation:
            if step.compensation_method:
                raise invalid_argument(
                    f"{at}.compensation_method", f"step {step.name!r}: set, but no_compensation is true"
                )
        elif not step.compensation_method:
            raise invalid_argument(
                f"{at}.compensation_method", f"step {step.name!r}: required unless no_compensation is set"
            )
        elif not _METHOD.match(step.compensation_method):
            raise invalid_argument(
                f"{at}.compensation_method", f"step {step.name!r}: expected '/package.Service/Method'"
            )
        before = [INPUT, *seen]
        _check_template(f"{at}.request", step.name, step.request, before)
        if step.HasField("compensation_request"):
            _check_template(
                f"{at}.compensation_request", step.name, step.compensation_request, [*before, step.name]
            )
        if step.HasField("timeout"):
            _check_duration(f"{at}.timeout", step.timeout, MAX_TIMEOUT_SECONDS)
        _check_retry(f"{at}.retry", step.name, step.retry)
        _check_retry(f"{at}.compensation_retry", step.name, step.compensation_retry)
        seen.append(step.name)


def validate_input(data: bytes, field: str = "input") -> None:
    """The saga input is bounded."""
    if len(data) > MAX_INPUT_BYTES:
        raise invalid_argument(field, f"larger than {MAX_INPUT_BYTES} bytes")
