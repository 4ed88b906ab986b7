"""The Bus's settings in ControlPlaneConfig: defaults, environment and validation naming the field."""

from __future__ import annotations

import pytest

from rpcmesh.controlplane.bus.component import make_store
from rpcmesh.controlplane.bus.nats_store import DEFAULT_PING_INTERVAL, NatsBusStore
from rpcmesh.controlplane.config import ControlPlaneConfig


def test_ping_interval_default_environment_and_store() -> None:
    assert ControlPlaneConfig().bus_ping_interval == DEFAULT_PING_INTERVAL == 5.0
    config = ControlPlaneConfig.from_env(
        {
            "RPCMESH_BUS": "nats://a:4222,nats://b:4222",
            "RPCMESH_BUS_PING_INTERVAL": "1.5",
            "RPCMESH_BUS_REPLICAS": "3",
        }
    )
    assert (config.bus_ping_interval, config.bus_replicas) == (1.5, 3)
    store = make_store(config)
    assert isinstance(store, NatsBusStore)
    assert (store.ping_interval, store.replicas) == (1.5, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bus_ping_interval": 0}, "bus_ping_interval: must be > 0"),
        ({"bus_ping_interval": -1.0}, "bus_ping_interval: must be > 0"),
        ({"bus_ping_interval": 7200.0}, "bus_ping_interval: must be > 0 and <= 3600"),
        ({"bus_replicas": 0}, "bus_replicas: must be 1-5"),
        ({"bus": "redis://x"}, "bus: expected a nats:// URL"),
    ],
)
def test_invalid_bus_settings_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ControlPlaneConfig(**kwargs)  # type: ignore[arg-type]
