"""Mapping a group's delivery policy onto a JetStream consumer."""

from __future__ import annotations

import pytest

from rpcmesh.controlplane.bus.consumer_policy import ConsumerSettings, consumer_settings, over_delivered
from rpcmesh.controlplane.bus.group_state import DeliveryPolicy
from rpcmesh.controlplane.bus.jetstream_group import consumer_name, describe, parse_description


def test_backoff_is_deadline_plus_redelivery_delay_and_one_spare_delivery() -> None:
    settings = consumer_settings(DeliveryPolicy(ack_deadline=2.0, max_deliveries=4, redelivery_backoff=1.0))
    assert settings.max_deliver == 5
    assert settings.backoff == (3.0, 4.0, 6.0, 10.0)
    assert settings.ack_wait == 3.0


def test_no_backoff_and_unlimited_deliveries() -> None:
    settings = consumer_settings(DeliveryPolicy(ack_deadline=5.0, max_deliveries=0, redelivery_backoff=0.0))
    assert (settings.ack_wait, settings.max_deliver, settings.backoff) == (5.0, -1, ())
    unlimited = consumer_settings(DeliveryPolicy(ack_deadline=1.0, max_deliveries=0, redelivery_backoff=0.5))
    assert unlimited.max_deliver == -1 and len(unlimited.backoff) == 16
    assert unlimited.backoff[-1] == 1.0 + 300.0  # capped by MAX_BACKOFF


def test_single_delivery_keeps_backoff_shorter_than_max_deliver() -> None:
    settings = consumer_settings(DeliveryPolicy(ack_deadline=1.0, max_deliveries=1, redelivery_backoff=1.0))
    assert settings.max_deliver == 2 and len(settings.backoff) == 1


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="ack_wait"):
        ConsumerSettings(ack_wait=0, max_deliver=1)
    with pytest.raises(ValueError, match="max_deliver"):
        ConsumerSettings(ack_wait=1, max_deliver=0)
    with pytest.raises(ValueError, match="backoff"):
        ConsumerSettings(ack_wait=1, max_deliver=2, backoff=(1.0, 2.0))


def test_over_delivered() -> None:
    assert not over_delivered(3, 3)
    assert over_delivered(4, 3)
    assert not over_delivered(100, 0)


def test_consumer_names_and_descriptions_round_trip() -> None:
    name = consumer_name("billing.workers v2")
    assert name.startswith("G_billing_workers_v2_") and " " not in name and "." not in name
    assert consumer_name("a.b") != consumer_name("a_b")
    policy = DeliveryPolicy(ack_deadline=3.0, max_deliveries=7, redelivery_backoff=0.25)
    assert parse_description(describe("g.1", policy)) == ("g.1", policy)
    assert parse_description("someone else's consumer") is None
    assert parse_description(None) is None
