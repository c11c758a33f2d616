"""Throw-away X.509 material for the emulators: a CA, server certificates and self-signed certs.

The emulated API server presents a certificate signed by its own CA (kubeconfigs carry the CA as
`certificate-authority-data`); emulated Felix metrics listeners use `make_self_signed`, which is
what a platform serving the endpoint over TLS typically does.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

__all__ = [
    "CertFiles",
    "KeyType",
    "make_ca",
    "make_self_signed",
    "make_signed",
    "server_ssl_context",
    "write_pem_files",
]


@dataclass(frozen=True, slots=True)
class CertFiles:
    """PEM files written by `write_pem_files`; `directory` is the caller's to delete."""

    directory: Path
    cert: Path
    key: Path


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(days: int, not_after: datetime | None) -> tuple[datetime, datetime]:
    now = datetime.now(UTC).replace(microsecond=0)
    if not_after is None:
        # a little slack backwards so clock skew between threads/processes never matters
        return now - timedelta(minutes=5), now + timedelta(days=days)
    if not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=UTC)
    # an already expired certificate must still have not_before < not_after
    not_before = min(now - timedelta(minutes=5), not_after - timedelta(days=days))
    return not_before, not_after


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _leaf_extensions(
    builder: x509.CertificateBuilder, key: PrivateKey, hosts: Sequence[str]
) -> x509.CertificateBuilder:
    builder = builder.add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            key_encipherment=isinstance(key, rsa.RSAPrivateKey),
            content_commitment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
    )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder


def make_self_signed(
    common_name: str,
    *,
    hosts: list[str],
    key_type: KeyType = "ec",
    days: int = 365,
    not_after: datetime | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed server certificate (subject == issuer) and its key, both PEM.

    `hosts` become subjectAltNames (IP addresses as IP entries, the rest as DNS names).
    `not_after` in the past gives an expired certificate.
    """
    key = _new_key(key_type)
    return issue(common_name, key=key, hosts=hosts, days=days, not_after=not_after), _key_pem(key)


def issue(
    common_name: str,
    *,
    key: PrivateKey,
    hosts: Sequence[str],
    issuer: x509.Name | None = None,
    signer: PrivateKey | None = None,
    days: int = 365,
    not_after: datetime | None = None,
) -> bytes:
    """A server certificate (PEM) for `key`: self-signed unless `issuer`/`signer` are given.

    Callers that need many certificates quickly (a fleet of TLS nodes) pass one shared key.
    """
    signer = signer or key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, expires = _validity(days, not_after)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(expires)
    )
    builder = _leaf_extensions(builder, key, hosts)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
    )
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_ca(
    common_name: str = "felixscan-emulator-ca", *, key_type: KeyType = "ec", days: int = 365
) -> tuple[bytes, bytes]:
    """A CA certificate (basicConstraints CA:TRUE) and its key, both PEM."""
    key = _new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, expires = _validity(days, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_signed(
    common_name: str,
    *,
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    hosts: list[str],
    key_type: KeyType = "ec",
    days: int = 365,
    not_after: datetime | None = None,
) -> tuple[bytes, bytes]:
    """A server certificate signed by the given CA, and its key, both PEM."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError("the CA key must be an EC or RSA key")
    key = _new_key(key_type)
    cert = issue(common_name, key=key, hosts=hosts, issuer=ca_cert.subject, signer=ca_key,
                 days=days, not_after=not_after)
    return cert, _key_pem(key)


def write_pem_files(
    cert_pem: bytes,
    key_pem: bytes,
    directory: Path | str | None = None,
    *,
    stem: str = "tls",
) -> CertFiles:
    """Write `<stem>.crt` and `<stem>.key` (mode 0600) into `directory` (a new temp dir if None)."""
    target = (
        Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="felixscan-"))
    )
    target.mkdir(parents=True, exist_ok=True)
    cert_path = target / f"{stem}.crt"
    key_path = target / f"{stem}.key"
    cert_path.write_bytes(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    return CertFiles(directory=target, cert=cert_path, key=key_path)


def server_ssl_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server-side SSLContext presenting the given certificate (chain) and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # ssl can only load keys from files; keep them on disk just long enough to load
    with tempfile.TemporaryDirectory(prefix="felixscan-tls-") as tmp:
        files = write_pem_files(cert_pem, key_pem, tmp)
        ctx.load_cert_chain(files.cert, files.key)
    return ctx
