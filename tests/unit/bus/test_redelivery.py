import pytest

from rpcmesh.controlplane.bus.redelivery import exhausted, redelivery_delay


def test_backoff_doubles_and_caps() -> None:
    assert [redelivery_delay(a, 1.0) for a in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert redelivery_delay(40, 1.0, cap=300.0) == 300.0
    assert redelivery_delay(3, 0.0) == 0.0


def test_attempt_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attempt"):
        redelivery_delay(0, 1.0)


def test_exhausted() -> None:
    assert not exhausted(4, 5)
    assert exhausted(5, 5)
    assert not exhausted(100, 0)
