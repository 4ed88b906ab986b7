"""Which registered service a gRPC method goes to: pure routing decisions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from rpcmesh.errors import invalid_argument

# Callers may name the destination themselves with this metadata key.
SERVICE_HEADER = "x-rpcmesh-service"
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def split_method(method: str) -> tuple[str, str]:
    """'/pkg.Svc/Method' -> ('pkg.Svc', 'Method'); INVALID_ARGUMENT when malformed."""
    parts = method.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        raise invalid_argument("method", f"expected /package.Service/Method, got {method!r}")
    return parts[1], parts[2]


def default_service_name(grpc_service: str) -> str:
    """The conventional registry name of a gRPC service: its simple name, lowercased.

    ``shop.v1.Orders`` -> ``orders``; ``echo.v1.Echo`` -> ``echo``.
    """
    return grpc_service.rsplit(".", 1)[-1].lower()


@dataclass(frozen=True, kw_only=True)
class RouteTable:
    """Maps gRPC services (or packages, with a trailing ``.*``) to registered service names."""

    routes: Mapping[str, str] = field(default_factory=dict)
    """``{"shop.v1.Orders": "orders", "legacy.*": "legacy-adapter"}``; exact names win over prefixes."""

    allow_header: bool = True
    """Let callers choose the destination with the ``x-rpcmesh-service`` metadata key."""

    use_convention: bool = True
    """Fall back to :func:`default_service_name` for unrouted services."""

    def __post_init__(self) -> None:
        for source, target in self.routes.items():
            if not source or source.startswith("/"):
                raise ValueError(f"routes: bad gRPC service pattern {source!r}")
            if not _DNS_LABEL.match(target):
                raise ValueError(f"routes[{source!r}]: {target!r} is not a valid service name")

    @classmethod
    def parse(cls, specs: list[str], **options: bool) -> RouteTable:
        """Build from ``GRPC_SERVICE=NAME`` strings, as given on the command line."""
        routes: dict[str, str] = {}
        for spec in specs:
            source, sep, target = spec.partition("=")
            if not sep:
                raise ValueError(f"--route: expected GRPC_SERVICE=NAME, got {spec!r}")
            routes[source.strip()] = target.strip()
        return cls(routes=routes, **options)

    def resolve(self, method: str, metadata: Mapping[str, str] | None = None) -> str:
        """The registered service name for a call to ``method``."""
        grpc_service, _ = split_method(method)
        if grpc_service in self.routes:
            return self.routes[grpc_service]
        best = ""
        for pattern in self.routes:
            if pattern.endswith(".*") and grpc_service.startswith(pattern[:-1]) and len(pattern) > len(best):
                best = pattern
        if best:
            return self.routes[best]
        if self.allow_header and metadata and metadata.get(SERVICE_HEADER):
            name = metadata[SERVICE_HEADER]
            if not _DNS_LABEL.match(name):
                raise invalid_argument(SERVICE_HEADER, f"{name!r} is not a valid service name")
            return name
        if self.use_convention:
            return default_service_name(grpc_service)
        raise invalid_argument("method", f"no route for {grpc_service}")
