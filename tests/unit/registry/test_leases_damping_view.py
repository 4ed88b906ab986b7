from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry.damping import DamperState, observe
from rpcmesh.controlplane.registry.leases import LeaseTable
from rpcmesh.controlplane.registry.model import DELETE, PUT, Event
from rpcmesh.controlplane.registry.view import RegistryView


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lease_expires_after_ttl_unless_renewed() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    table.grant("a", ("s", "1"), "h", 1000)
    table.grant("b", ("s", "2"), "h", 1000)
    clock.now += 0.9
    assert table.renew("a") is not None
    assert table.pop_expired() == []
    clock.now += 0.2
    assert [lease.lease_id for lease in table.pop_expired()] == ["b"]
    assert table.renew("b") is None and "b" not in table
    clock.now += 0.7
    assert table.pop_expired() == []
    clock.now += 0.2
    assert [lease.lease_id for lease in table.pop_expired()] == ["a"]
    assert table.seconds_to_next_deadline() is None


def test_renewing_an_overdue_lease_fails() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    table.grant("a", ("s", "1"), "h", 1000)
    clock.now += 1.0
    assert table.renew("a") is None


def test_monotonic_clock_only_wall_clock_is_not_consulted() -> None:
    clock = FakeClock()
    table = LeaseTable(clock)
    table.grant("a", ("s", "1"), "h", 5000)
    # Only the injected monotonic clock moves leases: nothing else can expire them.
    assert table.pop_expired() == [] and table.seconds_to_next_deadline() == 5.0


def test_damping_needs_n_failures_and_m_successes() -> None:
    state = DamperState()
    for ok, passing in [
        (False, True),
        (True, True),
        (False, True),
        (False, False),
        (True, False),
        (True, True),
    ]:
        state = observe(state, ok, failures_before_critical=2, successes_before_passing=2)
        assert state.passing is passing


def test_damping_thresholds_of_one() -> None:
    state = observe(DamperState(), False, failures_before_critical=0, successes_before_passing=0)
    assert not state.passing
    assert observe(state, True, failures_before_critical=1, successes_before_passing=1).passing


def inst(service: str, iid: str, **fields: object) -> registry_pb2.Instance:
    return registry_pb2.Instance(
        service=service, instance_id=iid, health=registry_pb2.HEALTH_STATE_PASSING, **fields
    )  # type: ignore[arg-type]


def test_view_applies_events_in_order_and_ignores_old_ones() -> None:
    view = RegistryView()
    assert view.apply(Event(1, PUT, inst("a", "1")))
    assert view.apply(Event(2, PUT, inst("b", "1")))
    assert not view.apply(Event(2, DELETE, inst("a", "1")))
    assert view.apply(Event(3, DELETE, inst("a", "1")))
    assert view.revision == 3 and [i.service for i in view.instances()] == ["b"]
    summaries, token = view.list_services(10, "")
    assert [s.name for s in summaries] == ["b"] and token == ""


def test_view_resolve_filters() -> None:
    critical = registry_pb2.HEALTH_STATE_CRITICAL
    view = RegistryView(
        [
            inst("s", "1", zone="eu", tags=["x", "y"], metadata={"k": "v"}, version="1"),
            inst("s", "2", zone="us", tags=["x"], version="2"),
            registry_pb2.Instance(service="s", instance_id="3", health=critical),
        ],
        revision=3,
    )
    ids = lambda found: [i.instance_id for i in found]  # noqa: E731
    assert ids(view.resolve("s")) == ["1", "2"]
    assert ids(view.resolve("s", include_unhealthy=True)) == ["1", "2", "3"]
    assert ids(view.resolve("s", zone="eu")) == ["1"]
    assert ids(view.resolve("s", tags=["x"])) == ["1", "2"]
    assert ids(view.resolve("s", tags=["x", "y"])) == ["1"]
    assert ids(view.resolve("s", metadata={"k": "v"})) == ["1"]
    assert ids(view.resolve("s", version="2")) == ["2"]
    assert view.resolve("other") == []


def test_view_pagination() -> None:
    view = RegistryView([inst(f"s{i}", "1") for i in range(5)], revision=5)
    page1, token = view.list_services(2, "")
    page2, token2 = view.list_services(2, token)
    page3, token3 = view.list_services(2, token2)
    assert [s.name for s in page1 + page2 + page3] == ["s0", "s1", "s2", "s3", "s4"]
    assert token3 == ""
