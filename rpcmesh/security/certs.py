"""Development certificates: a CA, and server and client certificates it signs.

``rpcmesh certs`` writes them into a folder so that local TLS and mTLS take one
command. Keys are ECDSA P-256; server certificates carry the SANs clients verify
(``127.0.0.1``, ``localhost`` and any given names); client certificates carry
the identity as common name and as a DNS SAN, which the control plane reads as
the caller's identity. These are for development and tests: a production
deployment brings certificates from its own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "IssuedCertificate",
    "create_ca",
    "issue_certificate",
    "write_development_set",
]

DEFAULT_VALIDITY = datetime.timedelta(days=365)
"""How long development certificates are valid."""


@dataclass(frozen=True, kw_only=True)
class IssuedCertificate:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    """The certificate."""

    key_pem: bytes
    """Its private key (PKCS#8, unencrypted)."""

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        """Write ``name.crt`` and ``name.key`` (mode 0600) into ``folder``; returns both paths."""
        folder.mkdir(parents=True, exist_ok=True)
        cert_path = folder / f"{name}.crt"
        key_path = folder / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.key_pem)
        return cert_path, key_path


@dataclass(frozen=True, kw_only=True)
class CertificateAuthority(IssuedCertificate):
    """A CA certificate and key that can sign further certificates."""

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load a CA written earlier by :meth:`write`."""
        return cls(cert_pem=cert_path.read_bytes(), key_pem=key_path.read_bytes())

    def certificate(self) -> x509.Certificate:
        """The parsed CA certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The parsed CA key."""
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("CA key: expected an EC private key")
        return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(
    common_name: str = "rpcmesh development CA",
    *,
    not_before: datetime.datetime | None = None,
    validity: datetime.timedelta = DEFAULT_VALIDITY,
) -> CertificateAuthority:
    """A self-signed CA certificate for development."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = not_before or _now() - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def issue_certificate(
    ca: CertificateAuthority,
    common_name: str,
    *,
    names: Sequence[str] = (),
    server: bool = True,
    client: bool = False,
    not_before: datetime.datetime | None = None,
    validity: datetime.timedelta = DEFAULT_VALIDITY,
) -> IssuedCertificate:
    """A certificate signed by ``ca``.

    Args:
        ca: The signing CA.
        common_name: Subject CN; for client certificates the caller's identity.
        names: Subject alternative names (IP addresses or DNS names); the CN is
            added as a DNS name when it is a valid one and not listed.
        server: Allow TLS server authentication.
        client: Allow TLS client authentication.
        not_before: Start of validity (default: five minutes ago); tests use a
            past window to make an expired certificate.
        validity: Length of the validity window.
    """
    if not common_name:
        raise ValueError("common_name: must not be empty")
    if not (server or client):
        raise ValueError("a certificate must allow server or client authentication")
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = ca.certificate()
    ca_key = ca.private_key()
    all_names = list(dict.fromkeys([*names, common_name]))
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    start = not_before or _now() - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san_entries(all_names)), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return IssuedCertificate(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


@dataclass(frozen=True, kw_only=True)
class DevelopmentSet:
    """Paths of what :func:`write_development_set` wrote."""

    ca_cert: Path
    """The CA certificate (give it to every client and, for mTLS, to servers)."""

    server_cert: Path
    """The server certificate."""

    server_key: Path
    """The server key."""

    clients: dict[str, tuple[Path, Path]]
    """Identity → (certificate, key) of each client certificate."""


def write_development_set(
    folder: Path,
    *,
    server_names: Sequence[str] = (),
    clients: Sequence[str] = (),
    validity: datetime.timedelta = DEFAULT_VALIDITY,
) -> DevelopmentSet:
    """Create (or reuse) ``ca.crt``/``ca.key`` in ``folder`` and issue a server and client certificates.

    An existing CA in the folder is reused, so running the command again for
    another client keeps earlier certificates valid.
    """
    ca_cert_path, ca_key_path = folder / "ca.crt", folder / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        ca = CertificateAuthority.load(ca_cert_path, ca_key_path)
    else:
        ca = create_ca(validity=validity)
        ca.write(folder, "ca")
    names = list(dict.fromkeys(["127.0.0.1", "localhost", *server_names]))
    server = issue_certificate(ca, "localhost", names=names, server=True, validity=validity)
    server_cert, server_key = server.write(folder, "server")
    issued: dict[str, tuple[Path, Path]] = {}
    for identity in clients:
        client = issue_certificate(ca, identity, server=False, client=True, validity=validity)
        issued[identity] = client.write(folder, f"client-{identity}")
    return DevelopmentSet(
        ca_cert=ca_cert_path, server_cert=server_cert, server_key=server_key, clients=issued
    )
