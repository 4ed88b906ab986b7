import pytest
from rpcmesh.v1 import bus_pb2, common_pb2

from rpcmesh.bus.payloads import content_type_of, decode, encode, message_type_of
from rpcmesh.errors import InvalidArgumentError


def test_protobuf_payload_round_trip() -> None:
    value = common_pb2.FieldViolation(field="a", description="b")
    data, kind = encode(value)
    assert kind == "application/x-protobuf; messageType=rpcmesh.v1.FieldViolation"
    assert message_type_of(kind) == "rpcmesh.v1.FieldViolation"
    message = bus_pb2.BusMessage(payload=data, content_type=kind)
    assert decode(message, common_pb2.FieldViolation) == value


def test_decode_refuses_another_type() -> None:
    message = bus_pb2.BusMessage(payload=b"", content_type=content_type_of(common_pb2.Payload))
    with pytest.raises(InvalidArgumentError, match=r"rpcmesh\.v1\.Payload"):
        decode(message, common_pb2.FieldViolation)


def test_raw_and_text_payloads() -> None:
    assert encode(b"raw") == (b"raw", "")
    assert encode("hé") == ("hé".encode(), "text/plain; charset=utf-8")
    assert message_type_of("application/json") is None
