"""The soak's restart schedule (pure): what the issue asks of it, for many seeds."""

from __future__ import annotations

import itertools
import random

from tests.integration.soak.cluster import Restart, plan_restarts


def plan(seed: int, mode: str) -> list[Restart]:
    return plan_restarts(random.Random(seed), mode=mode, restarts=10, gap=(0.5, 1.5), down=(0, 0.5))


def test_embedded_alternates_sigterm_and_kill_at_seeded_random_moments() -> None:
    for seed in range(200):
        restarts = plan(seed, "embedded")
        kinds = [r.kind for r in restarts]
        assert all(a != b for a, b in itertools.pairwise(kinds)), (seed, kinds)
        assert {r.node for r in restarts} == {"a"}
        assert all(0.5 <= r.gap_s <= 1.5 and 0 <= r.down_s <= 0.5 for r in restarts), seed
        assert plan(seed, "embedded") == restarts, seed


def test_scale_out_alternates_nodes_and_gives_each_node_both_kinds_of_stop() -> None:
    for seed in range(200):
        restarts = plan(seed, "scale-out")
        assert [r.node for r in restarts] == ["a", "b"] * 5, seed
        for node in "ab":
            assert {r.kind for r in restarts if r.node == node} == {"term", "kill"}, (seed, node)
        assert sum(r.kind == "kill" for r in restarts) == 5, seed
