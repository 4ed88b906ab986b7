"""ServiceHostConfig validation."""

from __future__ import annotations

import pytest

from rpcmesh.host import ServiceHostConfig


def test_defaults_and_advertised_address() -> None:
    config = ServiceHostConfig(service="echo", registry="127.0.0.1:50051")
    assert config.registries == ("127.0.0.1:50051",)
    assert config.advertised(4000) == "127.0.0.1:4000"
    wide = ServiceHostConfig(service="echo", registry=["a:1", "b:2"], host="0.0.0.0")
    assert wide.advertised(1) == "127.0.0.1:1" and wide.registries == ("a:1", "b:2")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"service": "Echo_1"}, "service: must be a DNS label"),
        ({"registry": "nohostport"}, "registry: expected host:port"),
        ({"registry": []}, "registry: at least one address"),
        ({"ttl": 0.5}, "ttl: must be between 1 s and 1 h"),
        ({"port": 70000}, "port: must be 0-65535"),
        ({"grace": -1}, "grace: must be >= 0"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"service": "echo", "registry": "127.0.0.1:1"}
    with pytest.raises(ValueError, match=message):
        ServiceHostConfig(**{**base, **kwargs})  # type: ignore[arg-type]
