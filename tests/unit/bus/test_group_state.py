from rpcmesh.v1 import bus_pb2

from rpcmesh.controlplane.bus.group_state import DeliveryPolicy, GroupState

POLICY = DeliveryPolicy(ack_deadline=10.0, max_deliveries=3, redelivery_backoff=1.0)


def msgs(*seqs: int, key: str = "") -> list[bus_pb2.BusMessage]:
    return [bus_pb2.BusMessage(sequence=s, key=key, topic="t") for s in seqs]


def seqs(entries: list) -> list[int]:  # type: ignore[type-arg]
    return [e.sequence for e in entries]


def test_delivers_in_order_and_advances_floor() -> None:
    state = GroupState(ack_floor=0)
    state.add_read(msgs(1, 2, 3), 3)
    taken = state.take("m", 2, 0.0, POLICY)
    assert seqs(taken) == [1, 2]
    assert state.held_by("m") == 2
    assert state.ack(2)
    assert state.ack_floor == 0
    assert state.ack(1)
    assert state.ack_floor == 2
    assert seqs(state.take("m", 10, 0.0, POLICY)) == [3]
    assert not state.ack(1)


def test_gaps_count_as_done() -> None:
    state = GroupState(ack_floor=0)
    state.add_read(msgs(2, 5), 6)
    assert state.ack_floor == 1
    state.take("m", 10, 0.0, POLICY)
    state.ack(2)
    state.ack(5)
    assert state.ack_floor == 6


def test_deadline_redelivers_with_backoff_then_dead_letters() -> None:
    state = GroupState(ack_floor=0)
    state.add_read(msgs(1), 1)
    assert state.take("m", 1, 0.0, POLICY)[0].attempts == 1
    assert state.expire(10.0) == []
    assert state.take("m", 1, 10.5, POLICY) == []  # backoff 1 s not over
    assert state.take("m", 1, 11.0, POLICY)[0].attempts == 2
    assert state.expire(21.0) == []
    assert state.take("m", 1, 23.0, POLICY)[0].attempts == 3  # backoff 2 s
    dead = state.expire(33.0)
    assert [(d.message.sequence, d.attempts, d.reason) for d in dead] == [(1, 3, "max_deliveries")]
    # A dead message holds the floor until its dead letter is stored.
    assert state.ack_floor == 0
    assert state.attempts_to_keep() == {1: 3}
    state.buried([1])
    assert state.ack_floor == 1


def test_nak_with_delay_and_term() -> None:
    state = GroupState(ack_floor=0)
    state.add_read(msgs(1, 2), 2)
    state.take("m", 2, 0.0, POLICY)
    assert state.nak(1, 0.0, delay=5.0) is None
    assert state.take("m", 5, 4.0, POLICY) == []
    assert seqs(state.take("m", 5, 5.0, POLICY)) == [1]
    dead = state.term(2, "bad payload")
    assert dead is not None and dead.reason == "bad payload" and dead.attempts == 1
    assert state.ack_floor == 0
    state.ack(1)
    assert state.ack_floor == 1
    state.buried([2])
    assert state.ack_floor == 2


def test_per_key_order_holds_later_messages() -> None:
    state = GroupState(ack_floor=0)
    state.add_read(msgs(1, 2, 3, key="k") + msgs(4, key="other"), 4)
    assert seqs(state.take("a", 10, 0.0, POLICY)) == [1, 4]
    assert state.take("b", 10, 0.0, POLICY) == []
    state.nak(1, 0.0, delay=0.0)
    assert seqs(state.take("b", 10, 0.0, POLICY)) == [1]
    state.ack(1)
    assert seqs(state.take("b", 10, 0.0, POLICY)) == [2]
    state.ack(2)
    assert seqs(state.take("a", 10, 0.0, POLICY)) == [3]


def test_member_gone_offers_again_at_once() -> None:
    state = GroupState(ack_floor=0)
    state.add_read(msgs(1, 2), 2)
    state.take("a", 10, 0.0, POLICY)
    assert state.member_gone("a") == []
    assert state.held_by("a") == 0
    again = state.take("b", 10, 0.0, POLICY)
    assert seqs(again) == [1, 2]
    assert [e.attempts for e in again] == [2, 2]


def test_recovers_from_persisted_floor() -> None:
    state = GroupState(ack_floor=3, acked_above_floor=[5])
    state.add_read(msgs(4, 5, 6), 6)
    assert seqs(state.take("m", 10, 0.0, POLICY)) == [4, 6]
    state.ack(4)
    assert state.ack_floor == 5


def test_skip_to_passes_retention_gap() -> None:
    state = GroupState(ack_floor=0)
    state.skip_to(10)
    assert state.ack_floor == 9
    assert state.next_sequence == 10


def test_attempt_counts_to_persist_cover_delivered_and_restored_messages() -> None:
    from rpcmesh.v1 import bus_pb2

    from rpcmesh.controlplane.bus.group_state import DeliveryPolicy, GroupState

    state = GroupState(ack_floor=0, attempts={3: 2, 9: 4})
    state.add_read([bus_pb2.BusMessage(sequence=s) for s in (1, 2, 3)], 3)
    taken = state.take("m", 2, now=0.0, policy=DeliveryPolicy())
    assert [(e.sequence, e.attempts) for e in taken] == [(1, 1), (2, 1)]
    assert state.attempts_to_keep() == {1: 1, 2: 1, 3: 2, 9: 4}  # 3 read back with its restored count
    state.ack(1)
    assert state.take("m", 1, now=0.0, policy=DeliveryPolicy())[0].attempts == 3
    assert state.attempts_to_keep() == {2: 1, 3: 3, 9: 4}


def test_attempt_counts_are_stored_as_runs() -> None:
    from rpcmesh.controlplane.bus.sqlite_store import decode_attempts, encode_attempts

    attempts = {5: 1, 6: 1, 7: 1, 8: 2, 10: 1}
    runs = encode_attempts(attempts)
    assert runs == [[5, 7, 1], [8, 8, 2], [10, 10, 1]]
    assert decode_attempts(runs) == attempts
    assert decode_attempts({"3": 2}) == {3: 2}
    assert decode_attempts([]) == {}


def test_a_dead_letter_replayed_into_another_group_is_done_at_once() -> None:
    state = GroupState(ack_floor=0, group="acker")
    replayed = bus_pb2.BusMessage(sequence=1, headers={"rpcmesh-replay-group": "lazy"})
    mine = bus_pb2.BusMessage(sequence=2, headers={"rpcmesh-replay-group": "acker"})
    state.add_read([replayed, mine], 2)
    assert seqs(state.take("m", 5, 0.0, POLICY)) == [2]
    assert state.ack_floor == 1


def test_last_error_is_the_last_naks_or_the_deadline() -> None:
    state = GroupState(ack_floor=0)
    state.add_read(msgs(1, 2, 3), 3)
    state.take("m", 3, 0.0, POLICY)
    assert state.nak(1, 0.0, 0.0, "e1") is None
    assert state.nak(2, 0.0, 0.0, "b1") is None
    state.take("m", 2, 0.0, POLICY)
    assert state.nak(1, 0.0, 0.0, "e2") is None
    term = state.term(2, "bad payload")
    assert term is not None and (term.reason, term.last_error) == ("bad payload", "b1")
    (entry,) = state.take("m", 1, 0.0, POLICY)
    assert entry.sequence == 1 and entry.attempts == 3
    dead = state.nak(1, 0.0, 0.0, "e3")
    assert dead is not None and (dead.reason, dead.attempts, dead.last_error) == ("max_deliveries", 3, "e3")
    # Message 3 was taken at 0.0 and never answered: its deadline (10 s) passes on every attempt.
    assert state.expire(10.0) == []
    assert seqs(state.take("m", 1, 20.0, POLICY)) == [3]
    assert state.expire(30.0) == []
    assert seqs(state.take("m", 1, 40.0, POLICY)) == [3]
    (late,) = state.expire(50.0)
    assert (late.reason, late.attempts, late.last_error) == ("max_deliveries", 3, "ack deadline passed")
