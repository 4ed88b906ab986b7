"""Local bookkeeping of a group served from a JetStream consumer."""

from __future__ import annotations

from rpcmesh.v1 import bus_pb2

from rpcmesh.controlplane.bus.consumer_ledger import ConsumerLedger, Fetched


def fetched(seq: int, key: str = "", attempts: int = 1) -> Fetched:
    return Fetched(message=bus_pb2.BusMessage(sequence=seq, key=key), attempts=attempts, handle=f"h{seq}")


def test_messages_go_out_in_sequence_order_within_member_room() -> None:
    ledger = ConsumerLedger()
    for seq in (3, 1, 2):
        ledger.offer(fetched(seq), now=0)
    assert [e.sequence for e in ledger.take("a", 2, now=0, ack_deadline=5)] == [1, 2]
    assert [e.sequence for e in ledger.take("b", 5, now=0, ack_deadline=5)] == [3]
    assert (ledger.held_by("a"), ledger.held_by("b"), ledger.buffered) == (2, 1, 0)
    assert ledger.finish(1) is not None and ledger.finish(1) is None
    assert ledger.held_by("a") == 1


def test_key_order_holds_later_messages_until_the_owner_finishes() -> None:
    ledger = ConsumerLedger()
    for seq in (1, 2, 3):
        ledger.offer(fetched(seq, key="k"), now=0)
    assert [e.sequence for e in ledger.take("a", 5, now=0, ack_deadline=5)] == [1]
    assert ledger.take("b", 5, now=0, ack_deadline=5) == []
    ledger.finish(1)
    assert [e.sequence for e in ledger.take("b", 5, now=0, ack_deadline=5)] == [2]


def test_a_returned_owner_keeps_its_key_until_it_comes_back_or_the_hold_runs_out() -> None:
    ledger = ConsumerLedger()
    ledger.offer(fetched(1, key="k"), now=0)
    ledger.offer(fetched(2, key="k"), now=0)
    ledger.take("a", 5, now=0, ack_deadline=5)
    assert ledger.release(1, now=0, hold_for=10) is not None
    assert ledger.take("a", 5, now=1, ack_deadline=5) == []
    ledger.offer(fetched(1, key="k", attempts=2), now=2)  # JetStream redelivered it
    again = ledger.take("a", 5, now=2, ack_deadline=5)
    assert [(e.sequence, e.attempts) for e in again] == [(1, 2)]
    ledger.release(1, now=3, hold_for=1)
    assert [e.sequence for e in ledger.take("a", 5, now=5, ack_deadline=5)] == [2]


def test_expiry_member_loss_and_redelivered_copies() -> None:
    ledger = ConsumerLedger()
    for seq in (1, 2):
        ledger.offer(fetched(seq), now=0)
    ledger.take("a", 1, now=0, ack_deadline=1)
    ledger.take("b", 1, now=0, ack_deadline=10)
    assert [e.sequence for e in ledger.expire(now=2, hold_for=1)] == [1]
    assert [e.sequence for e in ledger.member_gone("b", now=2, hold_for=1)] == [2]
    assert ledger.held_by("a") == ledger.held_by("b") == 0
    ledger.offer(fetched(3), now=0)
    ledger.take("a", 1, now=0, ack_deadline=10)
    stale = ledger.offer(fetched(3, attempts=2), now=11)
    assert stale is not None and ledger.held_by("a") == 0
    assert [e.attempts for e in ledger.take("a", 1, now=11, ack_deadline=10)] == [2]


def test_waiting_messages_are_touched_and_drain_forgets_everything() -> None:
    ledger = ConsumerLedger()
    ledger.offer(fetched(1), now=0)
    ledger.offer(fetched(2), now=0)
    ledger.take("a", 1, now=0, ack_deadline=10)
    assert ledger.touch_due(now=0.5, interval=1) == []
    assert [e.sequence for e in ledger.touch_due(now=1, interval=1)] == [2]
    assert ledger.next_timer() == 10
    assert sorted(e.sequence for e in ledger.drain()) == [1, 2]
    assert ledger.buffered == 0 and ledger.held_by("a") == 0
