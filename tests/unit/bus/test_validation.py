import pytest
from google.protobuf.duration_pb2 import Duration
from rpcmesh.v1 import bus_pb2

from rpcmesh.controlplane.bus.validation import BusLimits, check_batch, subscription_settings
from rpcmesh.errors import InvalidArgumentError, ResourceExhaustedError

LIMITS = BusLimits(max_payload_bytes=10, max_header_bytes=20, max_batch=3)


def test_batch_checks_name_the_field() -> None:
    with pytest.raises(InvalidArgumentError, match=": topic:"):
        check_batch("", [bus_pb2.BusMessage()], LIMITS)
    with pytest.raises(InvalidArgumentError, match=": messages:"):
        check_batch("t", [], LIMITS)
    with pytest.raises(ResourceExhaustedError, match=r": messages\[1\].payload"):
        check_batch("t", [bus_pb2.BusMessage(), bus_pb2.BusMessage(payload=b"x" * 11)], LIMITS)
    with pytest.raises(ResourceExhaustedError, match=r": messages\[0\].headers"):
        check_batch("t", [bus_pb2.BusMessage(headers={"a": "b" * 30})], LIMITS)
    with pytest.raises(ResourceExhaustedError, match=": messages:"):
        check_batch("t", [bus_pb2.BusMessage()] * 4, LIMITS)
    with pytest.raises(InvalidArgumentError, match=r": messages\[0\].sequence"):
        check_batch("t", [bus_pb2.BusMessage(sequence=3)], LIMITS)


def test_subscription_defaults() -> None:
    settings = subscription_settings(bus_pb2.SubscriptionOptions(topic="a.*", group="g"), LIMITS)
    assert settings.max_in_flight == 256
    assert settings.max_batch == 64
    assert settings.policy.ack_deadline == 30.0
    assert settings.policy.max_deliveries == 5
    assert settings.start.kind == "new_only"
    assert not settings.broadcast


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (bus_pb2.SubscriptionOptions(topic="", group="g"), "open.topic"),
        (bus_pb2.SubscriptionOptions(topic="a", group=""), "open.group"),
        (bus_pb2.SubscriptionOptions(topic="a", group="a.b"), "open.group"),
        (
            bus_pb2.SubscriptionOptions(topic="a", group="g", mode=bus_pb2.DELIVERY_MODE_BROADCAST),
            "open.group",
        ),
        (
            bus_pb2.SubscriptionOptions(topic="a", group="g", ack_deadline=Duration(seconds=-1)),
            "open.ack_deadline",
        ),
        (
            bus_pb2.SubscriptionOptions(topic="a", group="g", start=bus_pb2.StartPosition(sequence=0)),
            "open.start.sequence",
        ),
    ],
)
def test_subscription_errors_name_the_field(options: bus_pb2.SubscriptionOptions, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        subscription_settings(options, LIMITS)
    assert info.value.message.startswith(field + ":")
