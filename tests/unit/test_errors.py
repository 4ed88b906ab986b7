"""The exception tree and its mapping to and from gRPC status."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2

from rpcmesh import errors


def test_from_status_picks_the_subclass() -> None:
    err = errors.from_status(grpc.StatusCode.NOT_FOUND, "lease l-1 not found")
    assert isinstance(err, errors.NotFoundError)
    assert isinstance(err, errors.RpcMeshError)
    assert err.code is grpc.StatusCode.NOT_FOUND
    assert str(err) == "NOT_FOUND: lease l-1 not found"


def test_unknown_codes_fall_back_to_status_error() -> None:
    err = errors.from_status(grpc.StatusCode.DATA_LOSS, "gone")
    assert type(err) is errors.StatusError
    assert err.code is grpc.StatusCode.DATA_LOSS


def test_invalid_argument_names_the_field_with_bad_request_detail() -> None:
    err = errors.invalid_argument("instance.address", "must be host:port")
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "instance.address: must be host:port"
    detail = err.detail(error_details_pb2.BadRequest)
    assert isinstance(detail, error_details_pb2.BadRequest)
    assert detail.field_violations[0].field == "instance.address"


def test_rpc_status_round_trip_keeps_code_message_and_details() -> None:
    err = errors.invalid_argument("ttl", "must be between 1s and 1h")
    status = err.to_rpc_status()
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "ttl: must be between 1s and 1h"
    assert any(key == "grpc-status-details-bin" for key, _ in status.trailing_metadata)


def test_code_helpers() -> None:
    assert errors.code_from_value(5) is grpc.StatusCode.NOT_FOUND
    assert errors.status_code_name(14) == "UNAVAILABLE"
