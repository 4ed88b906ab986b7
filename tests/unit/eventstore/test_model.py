from __future__ import annotations

import pytest

from rpcmesh.controlplane.eventstore.model import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    clamp_page_size,
    decode_page_token,
    encode_page_token,
    expected_matches,
    prefix_upper_bound,
)


def test_expected_matches() -> None:
    assert expected_matches(ANY, -1) and expected_matches(ANY, 4)
    assert expected_matches(NO_STREAM, -1) and not expected_matches(NO_STREAM, 0)
    assert expected_matches(STREAM_EXISTS, 0) and not expected_matches(STREAM_EXISTS, -1)
    assert expected_matches(3, 3) and not expected_matches(3, 2)
    with pytest.raises(ValueError):
        expected_matches(-7, 0)


@pytest.mark.parametrize(
    ("prefix", "bound"), [("order-", "order."), ("a", "b"), ("z\U0010ffff", "{"), ("\U0010ffff", None)]
)
def test_prefix_upper_bound(prefix: str, bound: str | None) -> None:
    assert prefix_upper_bound(prefix) == bound


def test_prefix_range_selects_exactly_the_prefix() -> None:
    names = ["order", "order-", "order-1", "order-\U0010ffff", "order.", "orders", "ordeq"]
    upper = prefix_upper_bound("order-")
    assert upper is not None
    assert [n for n in names if "order-" <= n < upper] == [n for n in names if n.startswith("order-")]


def test_page_size_and_tokens() -> None:
    assert clamp_page_size(0) == 100 and clamp_page_size(5000) == 1000 and clamp_page_size(7) == 7
    token = encode_page_token("f", "stream-a", 42)
    assert decode_page_token(token, "f", "stream-a") == 42
    with pytest.raises(ValueError):
        decode_page_token(token, "f", "stream-b")
    with pytest.raises(ValueError):
        decode_page_token("!!!", "f", "stream-a")
