"""DeadlineQueue: due order, re-arming, removal, ties, peeking and the bounded heap."""

from __future__ import annotations

import random

from rpcmesh.controlplane.registry.deadline_queue import COMPACT_FACTOR, COMPACT_MIN, DeadlineQueue


def _bound(live: int) -> int:
    """The most entries the heap may hold with ``live`` keys armed."""
    return live + max(COMPACT_MIN, COMPACT_FACTOR * live)


def test_keys_fall_due_earliest_first_at_or_after_their_deadline() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue()
    for key, deadline in [("c", 3.0), ("a", 1.0), ("d", 4.0), ("b", 2.0)]:
        queue.set(key, deadline)
    assert len(queue) == 4 and "a" in queue and "z" not in queue
    assert queue.pop_due(0.5) == []
    assert queue.pop_due(2.0) == ["a", "b"]  # a deadline equal to now is due
    assert len(queue) == 2 and "a" not in queue and queue.deadline("a") is None
    assert queue.pop_due(2.0) == []
    assert queue.pop_due(10.0) == ["c", "d"]
    assert len(queue) == 0 and queue.pop_due(100.0) == []


def test_equal_deadlines_fall_due_in_key_order_and_the_limit_cuts_between_them() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue()
    for key in ["m", "c", "x", "a"]:
        queue.set(key, 5.0)
    queue.set("early", 4.0)
    assert queue.pop_due(5.0, limit=3) == ["early", "a", "c"]
    assert queue.pop_due(5.0, limit=0) == []
    assert queue.pop_due(5.0) == ["m", "x"]


def test_re_arming_replaces_the_deadline_later_or_earlier() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue()
    queue.set("later", 1.0)
    queue.set("earlier", 9.0)
    queue.set("later", 5.0)  # re-armed before it fell due
    queue.set("earlier", 2.0)
    assert queue.deadline("later") == 5.0 and queue.deadline("earlier") == 2.0
    assert queue.pop_due(1.5) == []  # the old entry of "later" is stale
    assert queue.pop_due(4.0) == ["earlier"]
    assert queue.pop_due(8.0) == ["later"]
    assert queue.pop_due(20.0) == []  # the old entry of "earlier" (9.0) is stale, not due again


def test_re_arming_to_an_earlier_deadline_again_reports_the_key_once() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue()
    queue.set("a", 1.0)
    queue.set("a", 2.0)
    queue.set("a", 1.0)  # the first entry is live again, alongside a new one
    assert queue.due(3.0) == ["a"]
    assert queue.pop_due(3.0) == ["a"]
    assert queue.pop_due(3.0) == [] and queue.next_deadline() is None


def test_discard_disarms_and_ignores_unknown_keys() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue()
    queue.set("a", 1.0)
    queue.set("b", 2.0)
    queue.discard("a")
    queue.discard("never-armed")
    assert "a" not in queue and len(queue) == 1
    assert queue.next_deadline() == 2.0
    assert queue.pop_due(5.0) == ["b"]
    queue.set("a", 7.0)  # armed again after a discard: only the new deadline counts
    assert queue.pop_due(6.0) == [] and queue.pop_due(7.0) == ["a"]


def test_due_leaves_keys_armed_until_they_are_popped_or_moved() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue()
    queue.set("b", 1.0)
    queue.set("a", 1.0)
    queue.set("c", 3.0)
    assert queue.due(2.0) == ["a", "b"]
    assert queue.due(2.0) == ["a", "b"]  # still armed: reported again
    assert queue.due(2.0, limit=1) == ["a"]
    assert len(queue) == 3 and queue.deadline("a") == 1.0
    queue.set("a", 4.0)
    assert queue.due(3.0) == ["b", "c"]
    assert queue.pop_due(3.0) == ["b", "c"]
    assert queue.due(10.0) == ["a"]


def test_next_deadline_skips_stale_entries() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue()
    assert queue.next_deadline() is None
    queue.set("a", 1.0)
    queue.set("b", 3.0)
    assert queue.next_deadline() == 1.0
    queue.set("a", 5.0)
    assert queue.next_deadline() == 3.0
    queue.discard("b")
    assert queue.next_deadline() == 5.0
    queue.clear()
    assert queue.next_deadline() is None and len(queue) == 0 and queue.heap_size == 0


def test_re_arming_one_key_many_times_keeps_the_heap_bounded() -> None:
    queue: DeadlineQueue[str] = DeadlineQueue()
    queue.set("other", 1e9)
    for i in range(10_000):
        queue.set("a", float(i))  # never popped nor peeked: only compaction drops the old entries
        assert queue.heap_size <= _bound(len(queue))
    assert queue.deadline("a") == 9999.0
    assert queue.pop_due(9998.0) == []
    assert queue.next_deadline() == 9999.0
    assert queue.pop_due(1e9) == ["a", "other"]


def test_many_keys_re_armed_and_discarded_keep_the_heap_bounded() -> None:
    queue: DeadlineQueue[int] = DeadlineQueue()
    keys = range(200)
    for round_ in range(50):
        for key in keys:
            queue.set(key, float(round_ * 1000 + (key * 7) % 200))
            assert queue.heap_size <= _bound(len(queue))
    assert queue.pop_due(49_000.0 + 9.0) == sorted(keys, key=lambda k: ((k * 7) % 200, k))[:10]
    for key in keys:
        queue.discard(key)
        assert queue.heap_size <= _bound(len(queue))
    assert len(queue) == 0 and queue.next_deadline() is None


def test_matches_a_plain_model_under_random_operations() -> None:
    rng = random.Random(20240611)
    queue: DeadlineQueue[str] = DeadlineQueue()
    model: dict[str, float] = {}
    now = 0.0
    for _ in range(20_000):
        op = rng.random()
        key = f"k{rng.randrange(30)}"
        if op < 0.5:
            deadline = now + rng.choice([0.0, 1.0, 2.0, 3.0])  # few values: many ties and repeats
            queue.set(key, deadline)
            model[key] = deadline
        elif op < 0.6:
            queue.discard(key)
            model.pop(key, None)
        elif op < 0.75:
            now += rng.choice([0.0, 0.5, 1.0])
            limit = rng.randrange(1, 8)
            expected = [k for _, k in sorted((d, k) for k, d in model.items() if d <= now)][:limit]
            if rng.random() < 0.5:
                assert queue.due(now, limit) == expected
            else:
                assert queue.pop_due(now, limit) == expected
                for k in expected:
                    del model[k]
        else:
            assert queue.next_deadline() == min(model.values(), default=None)
        assert len(queue) == len(model)
        assert queue.heap_size <= _bound(len(model))
