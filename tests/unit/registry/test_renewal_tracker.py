"""The PostgreSQL expiry leader's deadline logic: renewal counters and an injected monotonic clock only."""

from __future__ import annotations

import time

import pytest

from rpcmesh.controlplane.registry.postgres_store import parse_renewal
from rpcmesh.controlplane.registry.renewal_tracker import RenewalTracker, Sighting


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _due_ids(tracker: RenewalTracker) -> list[str]:
    return [lease.lease_id for lease in tracker.due()]


def test_taking_over_gives_every_lease_its_full_ttl_from_now() -> None:
    clock = FakeClock()
    tracker = RenewalTracker(clock)
    # Whatever happened under the previous leader, each lease now has its full TTL.
    tracker.take_over([Sighting("a", 1000, 7), Sighting("b", 3000, 0)])
    assert tracker.seconds_to_next_deadline() == 1.0
    clock.now += 0.999
    assert _due_ids(tracker) == []
    clock.now += 0.001
    assert _due_ids(tracker) == ["a"]
    clock.now += 2.0
    assert _due_ids(tracker) == ["a", "b"]


def test_a_moved_counter_restarts_the_ttl_and_a_seen_one_does_not() -> None:
    clock = FakeClock()
    tracker = RenewalTracker(clock)
    assert tracker.observe(Sighting("a", 1000, 0))
    clock.now += 0.8
    assert tracker.observe(Sighting("a", 1000, 1))  # renewed through some node
    assert not tracker.observe(Sighting("a", 1000, 1))  # the same renewal seen twice
    assert not tracker.observe(Sighting("a", 1000, 0))  # an older sighting
    clock.now += 0.9
    assert _due_ids(tracker) == []
    clock.now += 0.1
    assert _due_ids(tracker) == ["a"]


def test_expiry_attempt_outcomes_renewal_racing_the_expiry_wins() -> None:
    clock = FakeClock()
    tracker = RenewalTracker(clock)
    tracker.take_over([Sighting("same", 1000, 3), Sighting("raced", 1000, 3), Sighting("gone", 1000, 3)])
    clock.now += 1.0
    due = {lease.lease_id: lease.renewals for lease in tracker.due()}
    assert due == {"same": 3, "raced": 3, "gone": 3}
    # Found under the lock: "same" still at 3 (deleted), "raced" at 4, "gone" deleted elsewhere.
    assert tracker.settle("same", 3)
    assert not tracker.settle("raced", 4)
    assert tracker.settle("gone", None)
    assert "same" not in tracker and "gone" not in tracker
    raced = tracker.get("raced")
    assert raced is not None and raced.renewals == 4
    assert tracker.seconds_to_next_deadline() == 1.0
    assert _due_ids(tracker) == []


def test_due_leases_stay_tracked_until_settled_and_stale_entries_are_skipped() -> None:
    clock = FakeClock()
    tracker = RenewalTracker(clock)
    tracker.observe(Sighting("a", 1000, 0))
    for renewals in range(1, 5):
        clock.now += 0.5
        tracker.observe(Sighting("a", 1000, renewals))
    clock.now += 1.0
    assert _due_ids(tracker) == ["a"]
    assert _due_ids(tracker) == ["a"]  # not settled yet: still due, reported once per call
    tracker.forget("a")
    assert _due_ids(tracker) == [] and tracker.seconds_to_next_deadline() is None


def test_limit_and_clear() -> None:
    clock = FakeClock()
    tracker = RenewalTracker(clock)
    tracker.take_over(Sighting(f"l{i}", 1000 + i, 0) for i in range(5))
    clock.now += 10
    assert [lease.lease_id for lease in tracker.due(limit=2)] == ["l0", "l1"]
    tracker.clear()
    assert len(tracker) == 0 and tracker.due() == []


def test_wall_clock_jumps_are_irrelevant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expiry never reads wall time: jumping it (time.time) neither expires nor prolongs a lease."""
    clock = FakeClock()
    tracker = RenewalTracker(clock)
    tracker.take_over([Sighting("a", 2000, 0)])
    wall = [time.time()]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "time_ns", lambda: int(wall[0] * 1e9))

    wall[0] += 86_400  # a day forward: nothing expires
    assert _due_ids(tracker) == [] and tracker.seconds_to_next_deadline() == 2.0
    clock.now += 1.0
    wall[0] -= 10 * 86_400  # ten days back: nothing is prolonged
    assert tracker.seconds_to_next_deadline() == 1.0
    clock.now += 1.0
    assert _due_ids(tracker) == ["a"]


def test_renewal_notification_payload() -> None:
    assert parse_renewal("abc123 7 1500") == Sighting("abc123", 1500, 7)
    assert parse_renewal("abc123 7") is None
    assert parse_renewal("abc123 x 1500") is None
    assert parse_renewal("") is None
