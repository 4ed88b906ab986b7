from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2, wrappers_pb2
from rpcmesh.v1 import saga_pb2 as pb

from rpcmesh.controlplane.saga.definition import RetrySettings, validate_definition
from rpcmesh.controlplane.saga.wire import FieldCopy, WireError, build_payload, copy_field, parse_fields
from rpcmesh.errors import InvalidArgumentError


def good() -> pb.SagaDefinition:
    return pb.SagaDefinition(
        name="order.place",
        steps=[
            pb.SagaStep(
                name="reserve",
                service="stock",
                method="/shop.v1.Stock/Reserve",
                compensation_method="/shop.v1.Stock/Release",
            ),
            pb.SagaStep(
                name="charge",
                service="payments",
                method="/shop.v1.Payments/Charge",
                no_compensation=True,
                request=pb.PayloadTemplate(
                    fields=[pb.FieldMapping(source="reserve", source_field=1, target_field=2)]
                ),
            ),
        ],
    )


def test_good_definition_passes() -> None:
    validate_definition(good())


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: setattr(d.steps[0], "method", "Reserve"), "definition.steps[0].method"),
        (lambda d: setattr(d.steps[0], "compensation_method", ""), "definition.steps[0].compensation_method"),
        (lambda d: setattr(d.steps[1], "name", "reserve"), "definition.steps[1].name"),
        (lambda d: setattr(d.steps[0], "service", "Bad Name"), "definition.steps[0].service"),
        (
            lambda d: d.steps[0].request.fields.add(source="charge", source_field=1, target_field=1),
            "definition.steps[0].request.fields[0].source",
        ),
        (
            lambda d: d.steps[1].request.fields.add(source="input", source_field=0, target_field=1),
            "definition.steps[1].request.fields[1].source_field",
        ),
        (lambda d: setattr(d.steps[0].request, "base", b"x" * 300_000), "definition.steps[0].request.base"),
        (lambda d: setattr(d, "name", "Bad"), "definition.name"),
        (lambda d: setattr(d.steps[0].retry, "max_attempts", 1000), "definition.steps[0].retry.max_attempts"),
    ],
)
def test_bad_definitions_name_the_field(mutate: object, field: str) -> None:
    definition = good()
    mutate(definition)  # type: ignore[operator]
    with pytest.raises(InvalidArgumentError) as info:
        validate_definition(definition)
    assert info.value.message.startswith(field + ":")


def test_retry_backoff_grows_and_caps() -> None:
    settings = RetrySettings(
        max_attempts=5, initial_backoff=0.1, max_backoff=0.3, multiplier=2, non_retryable=frozenset({9})
    )
    assert [settings.backoff(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    assert settings.retryable(14) and not settings.retryable(9)


def test_wire_copy_and_merge_semantics() -> None:
    source = timestamp_pb2.Timestamp(seconds=7, nanos=9).SerializeToString()
    assert [f.number for f in parse_fields(source)] == [1, 2]
    moved = copy_field(source, 1, 2)
    assert timestamp_pb2.Timestamp.FromString(moved) == timestamp_pb2.Timestamp(nanos=7)
    base = wrappers_pb2.StringValue(value="old").SerializeToString()
    text = wrappers_pb2.StringValue(value="new").SerializeToString()
    built = build_payload(base, "", [FieldCopy("input", 1, 1)], {"input": text})
    assert wrappers_pb2.StringValue.FromString(built).value == "new"
    assert build_payload(b"", "input", [], {"input": text}) == text
    with pytest.raises(WireError):
        parse_fields(b"\x0a\x05ab")
