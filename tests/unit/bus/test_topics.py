import pytest

from rpcmesh.controlplane.bus import topics


@pytest.mark.parametrize("name", ["orders", "orders.created", "a-b_c.D9", "$dlq.orders.g"])
def test_valid_topic_names(name: str) -> None:
    assert topics.topic_problem(name, allow_reserved=True) is None


@pytest.mark.parametrize("name", ["", ".a", "a.", "a..b", "a.*", "a.>", "a b", "a/b", "x" * 256, "$dlq.a"])
def test_invalid_topic_names(name: str) -> None:
    assert topics.topic_problem(name) is not None


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("*.b", "a.b", True),
        (">", "a.b.c", True),
        (">", "$dlq.a.g", False),
        ("$dlq.>", "$dlq.a.g", True),
        ("a.*.c", "a.b.d", False),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topics.matches(pattern, topic) is expected


@pytest.mark.parametrize("pattern", ["a.>.b", "a..b", "", "a.b c"])
def test_invalid_patterns(pattern: str) -> None:
    assert topics.pattern_problem(pattern) is not None


def test_group_names() -> None:
    assert topics.group_problem("workers-1") is None
    assert topics.group_problem("a.b") is not None
    assert topics.group_problem("") is not None


def test_dead_letter_and_event_topics() -> None:
    assert topics.dead_letter_topic("orders.created", "billing") == "$dlq.orders.created.billing"
    assert topics.event_topic("order.created") == "events.order.created"
