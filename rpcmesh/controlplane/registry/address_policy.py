"""Which instance addresses the Registry accepts: pure decision logic, applied at Register.

The control plane contacts registered addresses itself (health probes) and on a
saga starter's behalf (saga steps), so an address is a request to make the
control plane open a connection. Without a policy a service could register
``169.254.169.254:80`` and point the control plane at the cloud's metadata
service (credentials), or at any host only the control plane can reach.

Default (:class:`AddressPolicy` with no arguments), for the host of the address:

* refused always: the unspecified addresses (``0.0.0.0/8``, ``::``), multicast
  (``224.0.0.0/4``, ``ff00::/8``), the IPv4 broadcast ``255.255.255.255``, and the
  known cloud metadata endpoints (:data:`METADATA_ADDRESSES`, :data:`METADATA_HOSTS`);
* refused unless ``allow_link_local``: link-local ``169.254.0.0/16`` and ``fe80::/10``;
* allowed: everything else, loopback and private ranges included (services run on
  127.0.0.1 in development and tests).

The same rules apply to IPv6 forms that carry an IPv4 address: IPv4-mapped
(``::ffff:169.254.169.254``), IPv4-compatible (``::169.254.169.254``) and the
NAT64 well-known prefix (``64:ff9b::169.254.169.254``). Numeric IPv4 forms other
than a dotted quad (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``,
``169.254.43518``), which resolvers read as IPv4 addresses, are malformed for
:func:`rpcmesh.controlplane.registry.validation.address` (INVALID_ARGUMENT), so
they never reach the policy as host names.

With an allow-list (``allow``: CIDR ranges, single addresses and host name globs)
only the addresses it covers are accepted, on top of the refusals above; a host
name must then match one of its globs.

Host names are NOT resolved at Register: DNS may answer differently later, and
a blocking lookup does not belong on the request path. The health prober and
the saga invoker connect to whatever DNS says at the time, so a name that
resolves to a refused address (``evil.example.com`` -> ``169.254.169.254``) is
not caught here. Where that matters, set an allow-list of CIDR ranges only (no
host name globs), so that only literal addresses in known ranges are accepted,
or block the metadata addresses at the network level (IMDSv2 hop limit,
firewall rules), which is the defence that holds whatever the Registry does.

A well-formed address the policy refuses is answered with PERMISSION_DENIED
(the caller may not register it), with a ``google.rpc.ErrorInfo`` detail
(reason ``ADDRESS_NOT_ALLOWED``, metadata ``address`` and ``rule``); a malformed
address is INVALID_ARGUMENT naming ``instance.address``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field

from google.rpc import error_details_pb2

from rpcmesh.errors import PermissionDeniedError

__all__ = [
    "ERROR_DOMAIN",
    "ERROR_REASON",
    "METADATA_ADDRESSES",
    "METADATA_HOSTS",
    "AddressPolicy",
    "address_refused",
    "split_host",
]

ERROR_REASON = "ADDRESS_NOT_ALLOWED"
"""``ErrorInfo.reason`` of a refused address."""

ERROR_DOMAIN = "registry.rpcmesh"
"""``ErrorInfo.domain`` of a refused address."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ... instance metadata
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS Pod Identity agent
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "fd00:ec2::23",  # AWS EKS Pod Identity agent over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "192.0.0.192",  # Oracle Cloud metadata
        "168.63.129.16",  # Azure WireServer
    )
)
"""Known cloud metadata and credential endpoints: refused whatever the settings."""

METADATA_HOSTS: frozenset[str] = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
"""Known host names of cloud metadata services (compared without case and trailing dot)."""

_V4_UNSPECIFIED = ipaddress.IPv4Network("0.0.0.0/8")
_V4_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_V4_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
_V6_LINK_LOCAL = ipaddress.IPv6Network("fe80::/10")
_V6_COMPATIBLE = ipaddress.IPv6Network("::/96")
_V6_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOB = re.compile(r"^[A-Za-z0-9*?.-]+$")


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    plain = ipaddress.IPv6Address(int(address))  # without a scope id
    if plain in _V6_COMPATIBLE and int(plain) > 1:  # :: and ::1 are IPv6's own
        return ipaddress.IPv4Address(int(plain) & 0xFFFFFFFF)
    if plain in _V6_NAT64:
        return ipaddress.IPv4Address(int(plain) & 0xFFFFFFFF)
    return None


def _always_refused(ip: IPAddress) -> str | None:
    """Why no policy may allow ``ip`` (None: it may be allowed)."""
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _V4_UNSPECIFIED):
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == _V4_BROADCAST:
        return "the broadcast address"
    if _plain(ip) in METADATA_ADDRESSES:
        return "a cloud metadata endpoint"
    return None


def _plain(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return ipaddress.IPv6Address(int(ip))
    return ip


def _link_local(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in _V4_LINK_LOCAL
    return _plain(ip) in _V6_LINK_LOCAL


def split_host(address: str) -> str:
    """The host of a validated ``host:port`` (IPv6 without its brackets)."""
    host = address.rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


@dataclass(frozen=True, kw_only=True)
class AddressPolicy:
    """Which hosts instances may register (see the module docstring for the rules)."""

    allow: tuple[str, ...] = ()
    """When not empty, the only hosts accepted: CIDR ranges (``10.0.0.0/8``, ``fd00::/8``),
    single addresses (``10.1.2.3``) and host name globs (``*.svc.cluster.local``, matched
    without case). The always-refused addresses stay refused, and link-local ones need
    ``allow_link_local`` as well."""

    allow_link_local: bool = False
    """Accept link-local hosts (``169.254.0.0/16``, ``fe80::/10``), for deployments that
    really serve there. The metadata endpoints among them stay refused."""

    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False, default=())
    _globs: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if isinstance(self.allow, str):
            raise ValueError(
                f"address_policy.allow: must be a sequence of entries, got the string {self.allow!r}"
            )
        networks: list[IPNetwork] = []
        globs: list[str] = []
        for index, entry in enumerate(self.allow):
            where = f"address_policy.allow[{index}]"
            if not isinstance(entry, str) or not entry:
                raise ValueError(f"{where}: must be a non-empty string, got {entry!r}")
            if "/" in entry or ":" in entry or re.fullmatch(r"[0-9.]+", entry):
                try:
                    networks.append(ipaddress.ip_network(entry, strict=True))
                except ValueError as exc:
                    raise ValueError(
                        f"{where}: {entry!r} is not a CIDR range or IP address ({exc})"
                    ) from None
            elif _GLOB.match(entry):
                globs.append(entry.lower().rstrip("."))
            else:
                raise ValueError(f"{where}: {entry!r} is neither a CIDR range nor a host name glob")
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_globs", tuple(globs))

    def refusal(self, host: str) -> str | None:
        """Why ``host`` (an IP address without brackets, or a host name) is refused; None if allowed."""
        try:
            ip: IPAddress = ipaddress.ip_address(host)
        except ValueError:
            return self._host_name_refusal(host)
        return self._ip_refusal(ip)

    def _ip_refusal(self, ip: IPAddress) -> str | None:
        embedded = _embedded_v4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        for candidate, form in ((ip, ""), (embedded, f" (the IPv6 form of {embedded})")):
            if candidate is None:
                continue
            why = _always_refused(candidate)
            if why is not None:
                return f"{why}{form}"
            if _link_local(candidate) and not self.allow_link_local:
                return f"a link-local address{form}; set allow_link_local to accept it"
        if self.allow:
            plain = _plain(ip)
            covered = any(plain in net for net in self._networks) or (
                embedded is not None and any(embedded in net for net in self._networks)
            )
            if not covered:
                return "not in the allow-list"
        return None

    def _host_name_refusal(self, host: str) -> str | None:
        name = host.lower().rstrip(".")
        if name in METADATA_HOSTS:
            return "a cloud metadata host name"
        if self.allow and not any(fnmatch.fnmatchcase(name, glob) for glob in self._globs):
            return "a host name that matches no glob of the allow-list"
        return None

    def check(self, address: str, field: str = "instance.address") -> None:
        """Raise PERMISSION_DENIED, naming ``field`` and the rule, if ``address`` is refused.

        ``address`` must have passed :func:`rpcmesh.controlplane.registry.validation.address`.
        """
        why = address_refused(self, address)
        if why is None:
            return
        info = error_details_pb2.ErrorInfo(
            reason=ERROR_REASON, domain=ERROR_DOMAIN, metadata={"address": address, "rule": why}
        )
        raise PermissionDeniedError(
            f"{field}: {address!r} is not allowed: {why} (the registry's address policy)", details=[info]
        )


def address_refused(policy: AddressPolicy, address: str) -> str | None:
    """Why ``policy`` refuses the validated ``host:port`` ``address``; None if it is allowed."""
    return policy.refusal(split_host(address))
