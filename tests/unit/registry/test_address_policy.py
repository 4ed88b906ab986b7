"""The Registry's address policy: which hosts Register accepts, by default and with an allow-list."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from rpcmesh.v1 import registry_pb2

from rpcmesh.controlplane.registry import validation
from rpcmesh.controlplane.registry.address_policy import (
    ERROR_REASON,
    AddressPolicy,
    address_refused,
    split_host,
)
from rpcmesh.controlplane.registry.settings import RegistrySettings
from rpcmesh.errors import InvalidArgumentError, PermissionDeniedError

DEFAULT = AddressPolicy()

# (address, the start of the refusal or None when allowed) under the default policy.
DEFAULT_TABLE: list[tuple[str, str | None]] = [
    # allowed: loopback, private, public, host names
    ("127.0.0.1:5000", None),
    ("127.9.9.9:1", None),
    ("10.1.2.3:80", None),
    ("172.16.0.1:80", None),
    ("192.168.1.10:65535", None),
    ("100.64.0.1:80", None),
    ("8.8.8.8:53", None),
    ("169.253.255.255:80", None),
    ("169.255.0.1:80", None),
    ("[::1]:50051", None),
    ("[fd00::1]:80", None),
    ("[fd00:ec2::253]:80", None),
    ("[2001:db8::1]:80", None),
    ("[fec0::1]:80", None),
    ("[::ffff:10.0.0.1]:80", None),
    ("[::ffff:127.0.0.1]:80", None),
    ("localhost:80", None),
    ("svc.ns.svc.cluster.local:80", None),
    ("metadata-service:80", None),
    ("my.metadata.google.internal.example:80", None),
    # link-local and metadata, IPv4
    ("169.254.169.254:80", "a cloud metadata endpoint"),
    ("169.254.169.254:443", "a cloud metadata endpoint"),
    ("169.254.170.2:80", "a cloud metadata endpoint"),
    ("169.254.170.23:80", "a cloud metadata endpoint"),
    ("100.100.100.200:80", "a cloud metadata endpoint"),
    ("192.0.0.192:80", "a cloud metadata endpoint"),
    ("168.63.129.16:80", "a cloud metadata endpoint"),
    ("169.254.0.1:80", "a link-local address"),
    ("169.254.255.255:8080", "a link-local address"),
    # unspecified, multicast, broadcast
    ("0.0.0.0:80", "an unspecified address"),
    ("0.1.2.3:80", "an unspecified address"),
    ("224.0.0.1:80", "a multicast address"),
    ("239.255.255.250:1900", "a multicast address"),
    ("255.255.255.255:80", "the broadcast address"),
    # IPv6
    ("[::]:80", "an unspecified address"),
    ("[fe80::1]:80", "a link-local address"),
    ("[fe80::1%eth0]:80", "a link-local address"),
    ("[febf:ffff::1]:80", "a link-local address"),
    ("[fd00:ec2::254]:80", "a cloud metadata endpoint"),
    ("[fd00:ec2::23]:80", "a cloud metadata endpoint"),
    ("[ff02::1]:80", "a multicast address"),
    ("[ff05::1:3]:547", "a multicast address"),
    # IPv6 forms of refused IPv4 addresses
    ("[::ffff:169.254.169.254]:80", "a cloud metadata endpoint (the IPv6 form of 169.254.169.254)"),
    ("[::ffff:a9fe:a9fe]:80", "a cloud metadata endpoint (the IPv6 form of 169.254.169.254)"),
    ("[::ffff:169.254.1.1]:80", "a link-local address (the IPv6 form of 169.254.1.1)"),
    ("[::ffff:0.0.0.0]:80", "an unspecified address (the IPv6 form of 0.0.0.0)"),
    ("[::ffff:255.255.255.255]:80", "the broadcast address (the IPv6 form"),
    ("[::ffff:224.0.0.1]:80", "a multicast address (the IPv6 form"),
    ("[::169.254.169.254]:80", "a cloud metadata endpoint (the IPv6 form"),
    ("[64:ff9b::169.254.169.254]:80", "a cloud metadata endpoint (the IPv6 form"),
    ("[64:ff9b::a9fe:101]:80", "a link-local address (the IPv6 form of 169.254.1.1)"),
    # metadata host names, any case, with a trailing dot
    ("metadata.google.internal:80", "a cloud metadata host name"),
    ("METADATA.Google.Internal.:80", "a cloud metadata host name"),
    ("metadata:80", "a cloud metadata host name"),
    ("metadata.goog:80", "a cloud metadata host name"),
    ("instance-data:80", "a cloud metadata host name"),
    ("instance-data.ec2.internal:80", "a cloud metadata host name"),
]


@pytest.mark.parametrize(("address", "expected"), DEFAULT_TABLE)
def test_default_policy(address: str, expected: str | None) -> None:
    assert validation.address(address) == address  # well-formed: the policy decides, not validation
    why = address_refused(DEFAULT, address)
    if expected is None:
        assert why is None, f"{address}: refused ({why})"
    else:
        assert why is not None and why.startswith(expected), f"{address}: {why!r}"


LINK_LOCAL = AddressPolicy(allow_link_local=True)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("169.254.0.1:80", True),
        ("[fe80::1]:80", True),
        ("[::ffff:169.254.1.1]:80", True),
        ("169.254.169.254:80", False),  # metadata stays refused
        ("169.254.170.2:80", False),
        ("[::ffff:169.254.169.254]:80", False),
        ("[fd00:ec2::254]:80", False),
        ("0.0.0.0:80", False),
        ("[ff02::1]:80", False),
        ("metadata.google.internal:80", False),
        ("127.0.0.1:80", True),
    ],
)
def test_allow_link_local_lifts_link_local_only(address: str, allowed: bool) -> None:
    assert (address_refused(LINK_LOCAL, address) is None) is allowed, address


ALLOW_LIST = AddressPolicy(allow=("10.0.0.0/8", "fd00:1::/32", "192.168.7.7", "*.svc.cluster.local", "db-?"))


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("10.0.0.1:80", True),
        ("10.255.255.255:1", True),
        ("11.0.0.1:80", False),
        ("127.0.0.1:80", False),  # loopback too needs the list once there is one
        ("192.168.7.7:80", True),
        ("192.168.7.8:80", False),
        ("[fd00:1::5]:80", True),
        ("[fd00:2::5]:80", False),
        ("[::1]:80", False),
        ("[::ffff:10.1.2.3]:80", True),  # the mapped form of a listed address
        ("[::ffff:11.1.2.3]:80", False),
        ("echo.prod.svc.cluster.local:80", True),
        ("ECHO.prod.svc.cluster.local.:80", True),
        ("svc.cluster.local:80", False),
        ("db-1:5432", True),
        ("db-12:5432", False),
        ("localhost:80", False),
        ("169.254.1.1:80", False),
    ],
)
def test_allow_list_is_the_only_set_allowed(address: str, allowed: bool) -> None:
    why = address_refused(ALLOW_LIST, address)
    assert (why is None) is allowed, f"{address}: {why!r}"


def test_allow_list_cannot_lift_the_always_refused() -> None:
    everything = AddressPolicy(allow=("0.0.0.0/0", "::/0", "*"), allow_link_local=True)
    for address in ("169.254.169.254:80", "[fd00:ec2::254]:80", "0.0.0.0:1", "[::]:1", "224.0.0.1:1"):
        assert address_refused(everything, address) is not None, address
    assert address_refused(everything, "metadata.google.internal:80") is not None
    for address in ("169.254.1.1:80", "8.8.8.8:53", "[fe80::1]:80", "anything.example:80"):
        assert address_refused(everything, address) is None, address
    only_v4 = AddressPolicy(allow=("169.254.0.0/16",))
    assert address_refused(only_v4, "169.254.1.1:80") is not None  # listed, but link-local needs its flag


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (("10.0.0.0/33",), r"address_policy.allow\[0\]: '10.0.0.0/33' is not a CIDR range"),
        (("10.0.0.0/8", "10.0.0.1/8"), r"address_policy.allow\[1\]: '10.0.0.1/8' is not a CIDR range"),
        (("10.0.0.256",), r"address_policy.allow\[0\]: '10.0.0.256'"),
        (("fd00::/129",), r"address_policy.allow\[0\]: 'fd00::/129'"),
        (("zz::1",), r"address_policy.allow\[0\]: 'zz::1'"),
        (("",), r"address_policy.allow\[0\]: must be a non-empty string"),
        (("a b",), r"address_policy.allow\[0\]: 'a b' is neither a CIDR range nor a host name glob"),
        (("host_name",), r"address_policy.allow\[0\]"),
        ("10.0.0.0/8", r"address_policy.allow: must be a sequence"),
    ],
)
def test_bad_allow_entries_are_named(entries: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AddressPolicy(allow=entries)


def test_allow_entries_are_kept_as_a_tuple_and_compare() -> None:
    policy = AddressPolicy(allow=["10.0.0.0/8"])  # type: ignore[arg-type]
    assert policy.allow == ("10.0.0.0/8",)
    assert policy == AddressPolicy(allow=("10.0.0.0/8",))
    assert RegistrySettings().address_policy == DEFAULT
    with pytest.raises(ValueError, match="address_policy"):
        RegistrySettings(address_policy="10.0.0.0/8")  # type: ignore[arg-type]


def test_check_raises_permission_denied_with_the_reason() -> None:
    with pytest.raises(PermissionDeniedError) as caught:
        DEFAULT.check("169.254.169.254:80")
    error = caught.value
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.message.startswith("instance.address: '169.254.169.254:80' is not allowed: a cloud metadata")
    info = error.detail(error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == ERROR_REASON
    assert info.metadata["address"] == "169.254.169.254:80"
    assert info.metadata["rule"] == "a cloud metadata endpoint"
    DEFAULT.check("127.0.0.1:80")  # allowed: no error


@pytest.mark.parametrize(
    "address",
    [
        "2852039166:80",  # 169.254.169.254 as one number
        "0xa9fea9fe:80",
        "0xA9FEA9FE:80",
        "0251.0376.0251.0376:80",  # octal
        "169.254.43518:80",  # a.b.c with a 16-bit tail
        "169.16689662:80",
        "127.1:80",
        "010.0.0.1:80",  # a leading zero is octal to inet_aton
        "1:80",
        "169.254.169.254.:80",  # a trailing dot on a dotted quad
    ],
)
def test_numeric_ipv4_forms_are_malformed(address: str) -> None:
    """Resolvers read these as IPv4 addresses; they must not pass as host names."""
    with pytest.raises(
        InvalidArgumentError, match=r"^INVALID_ARGUMENT: instance.address: .* numeric IPv4 form"
    ):
        validation.address(address)


def test_register_request_validation_then_policy() -> None:
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.Instance(service="echo", address="[::ffff:169.254.169.254]:80")
    )
    spec = validation.register_request(request)
    with pytest.raises(PermissionDeniedError, match=r"IPv6 form of 169\.254\.169\.254"):
        DEFAULT.check(spec.instance.address)


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:80", "::1"),
        ("[fe80::1%eth0]:1", "fe80::1%eth0"),
        ("a.b:1", "a.b"),
    ],
)
def test_split_host(address: str, host: str) -> None:
    assert split_host(address) == host
