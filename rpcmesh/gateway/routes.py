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


_PATH_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


@dataclass(frozen=True, kw_only=True)
class HttpRoutes:
    """HTTP path prefixes routed to registered services: ``/api/users`` -> ``users``.

    A request to ``<prefix>/<Method>`` calls ``Method`` of the gRPC service (of that registered
    service's backend, found by reflection) that has a method of that name.
    """

    prefixes: Mapping[str, str] = field(default_factory=dict)
    """``{"/api/users": "users"}``."""

    def __post_init__(self) -> None:
        for prefix, target in self.prefixes.items():
            if not _PATH_PREFIX.match(prefix):
                raise ValueError(f"--route {prefix}={target}: {prefix!r} is not a path like /api/users")
            if not _DNS_LABEL.match(target):
                raise ValueError(f"--route {prefix}={target}: {target!r} is not a valid service name")

    @classmethod
    def parse(cls, specs: list[str]) -> HttpRoutes:
        """Build from ``/PATH=NAME`` strings, as given on the command line."""
        prefixes: dict[str, str] = {}
        for spec in specs:
            prefix, sep, target = spec.partition("=")
            if not sep:
                raise ValueError(f"--route: expected /PATH=NAME, got {spec!r}")
            prefixes[prefix.strip().rstrip("/")] = target.strip()
        return cls(prefixes=prefixes)

    def match(self, path: str) -> tuple[str, str] | None:
        """(registered service, method name) for ``<prefix>/<Method>``, or None when no prefix routes it."""
        prefix, _, method = path.rpartition("/")
        target = self.prefixes.get(prefix)
        return (target, method) if target is not None and method else None


def split_route_specs(specs: list[str]) -> tuple[list[str], list[str]]:
    """``--route`` values split into gRPC ones (``GRPC_SERVICE=NAME``) and HTTP ones (``/PATH=NAME``)."""
    grpc_specs = [spec for spec in specs if not spec.startswith("/")]
    http_specs = [spec for spec in specs if spec.startswith("/")]
    return grpc_specs, http_specs
