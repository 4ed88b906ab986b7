"""Group commit planning: each append judged alone, in order, with EventStoreDB's idempotence."""

from __future__ import annotations

import pytest

from rpcmesh.controlplane.eventstore.group import (
    DuplicateEvents,
    GroupPacer,
    PendingAppend,
    judge_duplicates,
    plan_group,
)
from rpcmesh.controlplane.eventstore.model import ANY, NO_STREAM, STREAM_EXISTS, AppendResult, NewEvent


def events(*ids: str) -> list[NewEvent]:
    return [NewEvent(event_id=i, event_type="T") for i in ids]


def test_a_wrong_expected_revision_fails_only_its_own_append() -> None:
    group = [
        PendingAppend("a", 4, events("1")),  # a is at 4: fine
        PendingAppend("b", 7, events("2")),  # b is at 3: wrong
        PendingAppend("c", NO_STREAM, events("3", "4")),
    ]
    plan = plan_group(group, head=10, currents={"a": 4, "b": 3}, stored={})
    assert plan.outcomes[0] == AppendResult(current_revision=5, position=11, appended=1)
    assert getattr(plan.outcomes[1], "current_revision", None) == 3
    assert plan.outcomes[2] == AppendResult(current_revision=1, position=13, appended=2)
    assert [(r[0], r[1], r[2]) for r in plan.rows] == [(11, "a", 5), (12, "c", 0), (13, "c", 1)]
    assert plan.head == 13  # gap-free: the failed member took no position


def test_two_appends_to_one_stream_in_one_group_are_ordered() -> None:
    group = [
        PendingAppend("s", NO_STREAM, events("x")),
        PendingAppend("s", 0, events("y")),  # sees the first
        PendingAppend("s", 0, events("z")),  # stale: fails alone
        PendingAppend("s", NO_STREAM, events("x")),  # a retry of the first, in the same group
        PendingAppend("s", ANY, events("y", "w")),  # partly duplicate: refused
    ]
    plan = plan_group(group, head=0, currents={}, stored={})
    assert plan.outcomes[0] == AppendResult(current_revision=0, position=1, appended=1)
    assert plan.outcomes[1] == AppendResult(current_revision=1, position=2, appended=1)
    assert getattr(plan.outcomes[2], "current_revision", None) == 1
    assert plan.outcomes[3] == AppendResult(current_revision=0, position=1, appended=0)
    assert isinstance(plan.outcomes[4], DuplicateEvents) and plan.outcomes[4].stored_ids == ["y"]
    assert len(plan.rows) == 2


@pytest.mark.parametrize("expected", [ANY, STREAM_EXISTS, 0])
def test_a_full_retry_returns_the_original_last_event(expected: int) -> None:
    stored = {"a": (1, 21), "b": (2, 22)}
    result = judge_duplicates(PendingAppend("s", expected, events("a", "b")), 9, stored)
    assert result == AppendResult(current_revision=2, position=22, appended=0)


def test_what_is_not_a_retry() -> None:
    stored = {"a": (1, 21), "b": (2, 22)}
    assert judge_duplicates(PendingAppend("s", ANY, events("n")), 9, {}) is None
    for append in [
        PendingAppend("s", ANY, events("a", "n")),  # partly stored
        PendingAppend("s", ANY, events("b", "a")),  # another order
        PendingAppend("s", 5, events("a", "b")),  # not where the expected revision puts it
        PendingAppend("s", NO_STREAM, events("a", "b")),
    ]:
        with pytest.raises(DuplicateEvents) as caught:
            judge_duplicates(append, 9, stored)
        assert caught.value.current_revision == 9


def test_a_repeated_id_within_a_batch_fails_that_append() -> None:
    plan = plan_group([PendingAppend("s", ANY, events("a", "a"))], head=0, currents={}, stored={})
    assert isinstance(plan.outcomes[0], ValueError) and not plan.rows


def test_group_size_caps_appends_and_events_but_takes_one() -> None:
    from rpcmesh.controlplane.eventstore.group import MAX_GROUP_APPENDS, MAX_GROUP_EVENTS, group_size

    assert group_size([]) == 0
    assert group_size([1] * (MAX_GROUP_APPENDS + 5)) == MAX_GROUP_APPENDS
    assert group_size([MAX_GROUP_EVENTS * 2, 1]) == 1
    assert group_size([MAX_GROUP_EVENTS // 2, MAX_GROUP_EVENTS // 2, 1]) == 2


def test_the_pacer_waits_for_as_many_appends_as_its_recent_groups_had() -> None:
    pacer = GroupPacer(window=3)
    assert pacer.target == 1  # a lone caller does not wait
    pacer.record(8)
    pacer.record(2)
    assert pacer.target == 8
    pacer.record(1)
    pacer.record(1)
    assert pacer.target == 2  # the 8 left the window
    pacer.record(1)
    assert pacer.target == 1


def test_waits_that_run_out_shrink_and_waits_that_fill_grow_back() -> None:
    pacer = GroupPacer(max_wait=0.008, min_wait=0.001)
    assert pacer.wait == 0.004
    pacer.waited(False)
    pacer.waited(False)
    assert pacer.wait == 0.001
    pacer.waited(False)
    assert pacer.wait == 0.001  # never below min_wait
    for _ in range(20):
        pacer.waited(True)
    assert pacer.wait == 0.008  # never above max_wait
