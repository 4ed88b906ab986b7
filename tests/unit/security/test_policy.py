"""Policy decisions, topic pattern coverage and the per-method access table."""

from __future__ import annotations

from pathlib import Path

import pytest
from rpcmesh.v1 import bus_pb2, eventstore_pb2, registry_pb2, saga_pb2

from rpcmesh.security.methods import accesses_for, known_methods, stream_kind
from rpcmesh.security.policy import ALL, Access, Action, Policy, load_policy, topic_covers

POLICY = Policy.from_mapping(
    {
        "admins": ["ops"],
        "identities": {
            "order-service": {
                "publish": ["orders.>"],
                "subscribe": ["payments.*"],
                "sagas": ["place-*"],
                "streams": ["order-"],
            },
            "reader": {"services": [], "discover": ["order-service"]},
        },
    }
)


@pytest.mark.parametrize(
    ("allowed", "requested", "covered"),
    [
        ("orders.>", "orders.created", True),
        ("orders.>", "orders.a.b", True),
        ("orders.>", "orders.*", True),
        ("orders.>", "orders.>", True),
        ("orders.>", "orders", False),
        ("orders.*", "orders.created", True),
        ("orders.*", "orders.*", True),
        ("orders.*", "orders.>", False),
        ("orders.*", "orders.a.b", False),
        ("orders.*", ">", False),
        (">", "anything.at.all", True),
        (">", "$dlq.orders.g", False),
        ("$dlq.>", "$dlq.orders.g", True),
        ("orders.created", "orders.created", True),
        ("orders.created", "orders.*", False),
    ],
)
def test_topic_covers(allowed: str, requested: str, covered: bool) -> None:
    assert topic_covers(allowed, requested) is covered


def test_own_service_by_default_and_not_others() -> None:
    assert POLICY.check("order-service", [Access(Action.REGISTER, "order-service")]) is None
    reason = POLICY.check("order-service", [Access(Action.REGISTER, "payment-service")])
    assert reason is not None and "register" in reason
    assert POLICY.check("reader", [Access(Action.REGISTER, "reader")]) is not None
    assert POLICY.check("reader", [Access(Action.RENEW, "lease")]) is not None
    assert POLICY.check("order-service", [Access(Action.RENEW, "lease")]) is None


def test_discover_defaults_to_everything_and_can_be_narrowed() -> None:
    assert POLICY.check("order-service", [Access(Action.DISCOVER, ALL)]) is None
    assert POLICY.check("reader", [Access(Action.DISCOVER, "order-service")]) is None
    assert POLICY.check("reader", [Access(Action.DISCOVER, "billing")]) is not None
    assert POLICY.check("reader", [Access(Action.DISCOVER, ALL)]) is not None


def test_topics_sagas_streams() -> None:
    ok = [
        Access(Action.PUBLISH, "orders.created"),
        Access(Action.SUBSCRIBE, "payments.done"),
        Access(Action.TOPIC_INFO, "orders.created"),
        Access(Action.SAGA, "place-order"),
        Access(Action.SAGA_BY_ID, "any-id"),
        Access(Action.READ_STREAM, "order-42"),
        Access(Action.APPEND_STREAM, "order-42"),
        Access(Action.REPLY, "_inbox.x"),
    ]
    assert POLICY.check("order-service", ok) is None
    for denied in [
        Access(Action.PUBLISH, "payments.done"),
        Access(Action.SUBSCRIBE, "payments.>"),
        Access(Action.SUBSCRIBE, ">"),
        Access(Action.SAGA, "refund"),
        Access(Action.SAGA, ALL),
        Access(Action.READ_STREAM, "payment-1"),
        Access(Action.READ_STREAM, ALL),
        Access(Action.ADMIN, "x"),
    ]:
        assert POLICY.check("order-service", [*ok, denied]) is not None, denied


def test_admin_and_unknown_identity() -> None:
    assert POLICY.check("ops", [Access(Action.ADMIN, "/x.Y/Z"), Access(Action.READ_STREAM, ALL)]) is None
    assert "not in the policy" in (POLICY.check("stranger", [Access(Action.DISCOVER, "a")]) or "")
    assert Policy(allow_all=True).check("anyone", [Access(Action.ADMIN, "x")]) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected a mapping"),
        ({"users": []}, "unknown keys"),
        ({"identities": {"a": {"publish": "orders..x"}}}, "identities.a.publish"),
        ({"identities": {"a": {"publish": [">.x"]}}}, "identities.a.publish"),
        ({"identities": {"a": {"topics": []}}}, "unknown keys"),
        ({"identities": {"a": {"sagas": [1]}}}, "identities.a.sagas"),
        ({"admins": {"x": 1}}, "admins"),
    ],
)
def test_bad_policy_names_the_field(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Policy.from_mapping(data)


def test_load_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("admins: [ops]\nidentities:\n  svc: {publish: ['a.>']}\n")
    policy = load_policy(path)
    assert policy.check("svc", [Access(Action.PUBLISH, "a.b")]) is None
    path.write_text("admins: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_policy(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_every_control_plane_method_is_in_the_table() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (registry_pb2, bus_pb2, saga_pb2, eventstore_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served == set(known_methods())


def test_table_names_the_resources() -> None:
    register = registry_pb2.RegisterRequest(instance=registry_pb2.Instance(service="order-service"))
    assert accesses_for("/rpcmesh.v1.Registry/Register", register) == [
        Access(Action.REGISTER, "order-service")
    ]
    publish = bus_pb2.PublishRequest(
        topic="a.b", messages=[bus_pb2.BusMessage(topic="c.d"), bus_pb2.BusMessage()]
    )
    assert accesses_for("/rpcmesh.v1.Bus/Publish", publish) == [
        Access(Action.PUBLISH, "a.b"),
        Access(Action.PUBLISH, "c.d"),
    ]
    ack = bus_pb2.SubscribeRequest(
        ack=bus_pb2.Ack(refs=[bus_pb2.MessageRef(topic="x.y"), bus_pb2.MessageRef(topic="x.y")])
    )
    assert accesses_for("/rpcmesh.v1.Bus/Subscribe", ack) == [Access(Action.SUBSCRIBE, "x.y")]
    event = bus_pb2.PublishEventRequest(event_type="order-placed")
    assert accesses_for("/rpcmesh.v1.Bus/PublishEvent", event) == [
        Access(Action.PUBLISH, "events.order-placed")
    ]
    start = saga_pb2.StartSagaRequest(definition=saga_pb2.SagaDefinition(name="inline"))
    assert accesses_for("/rpcmesh.v1.SagaCoordinator/StartSaga", start) == [Access(Action.SAGA, "inline")]
    read_all = eventstore_pb2.ReadAllRequest()
    assert accesses_for("/rpcmesh.v1.EventStore/ReadAll", read_all) == [Access(Action.READ_STREAM, ALL)]
    assert accesses_for("/other.Service/Method", None) == [Access(Action.ADMIN, "/other.Service/Method")]
    assert stream_kind("/rpcmesh.v1.Registry/Watch") == "watch"
    assert stream_kind("/rpcmesh.v1.Bus/Subscribe") == "subscription"
    assert stream_kind("/rpcmesh.v1.Registry/KeepAlive") is None


def test_groups_default_to_the_identitys_own_name_and_explicit_grants_replace_it() -> None:
    policy = Policy.from_mapping(
        {"identities": {"orders": {"subscribe": ["payments.*"]}, "audit": {"groups": ["ledger-*"]}}}
    )
    assert policy.check("orders", [Access(Action.GROUP, "orders")]) is None
    assert policy.check("orders", [Access(Action.GROUP, "orders-audit")]) is None
    reason = policy.check("orders", [Access(Action.GROUP, "payments-ledger")])
    assert reason is not None and "payments-ledger" in reason
    assert policy.check("orders", [Access(Action.GROUP, ALL)]) is not None
    assert policy.check("audit", [Access(Action.GROUP, "ledger-1")]) is None
    assert policy.check("audit", [Access(Action.GROUP, "audit")]) is not None


def test_subscribe_open_and_dead_letters_name_the_group() -> None:
    opened = bus_pb2.SubscribeRequest(open=bus_pb2.SubscriptionOptions(topic="payments.charged", group="g"))
    assert accesses_for("/rpcmesh.v1.Bus/Subscribe", opened) == [
        Access(Action.SUBSCRIBE, "payments.charged"),
        Access(Action.GROUP, "g"),
    ]
    broadcast = bus_pb2.SubscribeRequest(open=bus_pb2.SubscriptionOptions(topic="payments.charged"))
    assert accesses_for("/rpcmesh.v1.Bus/Subscribe", broadcast) == [
        Access(Action.SUBSCRIBE, "payments.charged")
    ]
    for method in ("ListDeadLetters", "ReplayDeadLetters"):
        request_type = getattr(bus_pb2, f"{method}Request")
        assert accesses_for(f"/rpcmesh.v1.Bus/{method}", request_type(topic="t", group="")) == [
            Access(Action.SUBSCRIBE, "t"),
            Access(Action.GROUP, ALL),
        ]


def test_calls_cover_a_whole_service_or_one_method_and_default_to_the_identitys_services() -> None:
    policy = Policy.from_mapping(
        {"identities": {"orders": {"calls": ["inventory", "payments/Refund*"]}, "payments": {}}}
    )
    assert policy.check("orders", [Access(Action.CALL, "inventory/Reserve")]) is None
    assert policy.check("orders", [Access(Action.CALL, "payments/RefundAll")]) is None
    assert policy.check("orders", [Access(Action.CALL, "payments/Charge")]) is not None
    assert policy.check("orders", [Access(Action.CALL, "inventory-admin/Wipe")]) is not None
    assert policy.check("payments", [Access(Action.CALL, "payments/Charge")]) is None
    assert policy.check("payments", [Access(Action.CALL, "inventory/Reserve")]) is not None
