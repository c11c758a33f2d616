"""A throw-away PKI for the signing tests, made with `cryptography` into a directory.

Root CA -> intermediate CA -> signer certificates (RSA as PEM files, ECDSA as PKCS#12, and an
expired one); a separate TSA root -> TSA certificate (RSA, as pyHanko's DummyTimeStamper
needs, with the critical timeStamping extended key usage RFC 3161 asks for); and an unrelated
root to play the wrong trust anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

SIGNER_CN = "felixscan report signer"
SIGNER_EC_CN = "felixscan report signer (ECDSA)"
TSA_CN = "felixscan test TSA"


@dataclass(frozen=True)
class Issued:
    key: PrivateKey
    cert: x509.Certificate
    cert_path: Path
    key_path: Path | None = None


@dataclass(frozen=True)
class TestPKI:
    root: Issued
    intermediate: Issued
    signer: Issued  # RSA, key PEM encrypted with `passphrase`, cert PEM
    signer_plain_key: Path  # the same key, unencrypted
    signer_p12: Path  # ECDSA P-256 key + cert + intermediate, encrypted with `passphrase`
    signer_ec: Issued
    expired: Issued  # RSA, expired a month ago, key encrypted with `passphrase`
    other_signer: Issued  # another RSA key and certificate, for the mismatch test
    tsa_root: Issued
    tsa: Issued  # RSA, issued by tsa_root
    other_root: Issued  # trusts nothing here
    passphrase: bytes
    signer_not_after: datetime

    __test__ = False  # a data holder, not a test class, despite its name


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "felixscan tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, sign: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=sign, content_commitment=sign and not ca,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                         decipher_only=False)


def _issue(cn: str, key: PrivateKey, issuer: Issued | None, *, ca: bool,
           not_before: datetime, not_after: datetime, directory: Path, stem: str,
           eku: list[x509.ObjectIdentifier] | None = None) -> Issued:
    signing_key = key if issuer is None else issuer.key
    issuer_name = _name(cn) if issuer is None else issuer.cert.subject
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn)).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(_key_usage(sign=not ca, ca=ca), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   signing_key.public_key()), critical=False))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=True)
    cert = builder.sign(signing_key, hashes.SHA256())
    cert_path = directory / f"{stem}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(key, cert, cert_path)


def _with_key_file(issued: Issued, path: Path, passphrase: bytes | None) -> Issued:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    path.write_bytes(issued.key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8, encryption))
    return Issued(issued.key, issued.cert, issued.cert_path, path)


def make_pki(directory: Path, passphrase: bytes) -> TestPKI:
    now = datetime.now(UTC).replace(microsecond=0)
    day = timedelta(days=1)
    long_ago, far_ahead = now - 30 * day, now + 20 * 365 * day

    def rsa_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def ec_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    root = _issue("felixscan test root CA", ec_key(), None, ca=True, not_before=long_ago,
                  not_after=far_ahead, directory=directory, stem="root")
    intermediate = _issue("felixscan test issuing CA", ec_key(), root, ca=True,
                          not_before=long_ago, not_after=far_ahead - day,
                          directory=directory, stem="intermediate")
    # A year's validity: long enough for every test, short enough that "a check made after
    # it expired" is a validation time the CAs and the TSA still cover.
    signer_not_after = now + 365 * day
    signer = _issue(SIGNER_CN, rsa_key(), intermediate, ca=False, not_before=now - day,
                    not_after=signer_not_after, directory=directory, stem="signer")
    signer = _with_key_file(signer, directory / "signer.key", passphrase)
    plain = _with_key_file(signer, directory / "signer-plain.key", None).key_path
    assert plain is not None
    signer_ec = _issue(SIGNER_EC_CN, ec_key(), intermediate, ca=False, not_before=now - day,
                       not_after=signer_not_after, directory=directory, stem="signer-ec")
    p12 = directory / "signer-ec.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"felixscan", signer_ec.key, signer_ec.cert, [intermediate.cert],
        serialization.BestAvailableEncryption(passphrase)))
    expired = _issue("felixscan expired signer", rsa_key(), intermediate, ca=False,
                     not_before=now - 400 * day, not_after=now - 30 * day,
                     directory=directory, stem="expired")
    expired = _with_key_file(expired, directory / "expired.key", passphrase)
    other_signer = _issue("felixscan other signer", rsa_key(), intermediate, ca=False,
                          not_before=now - day, not_after=signer_not_after,
                          directory=directory, stem="other-signer")
    tsa_root = _issue("felixscan test TSA root", ec_key(), None, ca=True, not_before=long_ago,
                      not_after=far_ahead, directory=directory, stem="tsa-root")
    tsa = _issue(TSA_CN, rsa_key(), tsa_root, ca=False, not_before=long_ago,
                 not_after=far_ahead - day, directory=directory, stem="tsa",
                 eku=[ExtendedKeyUsageOID.TIME_STAMPING])
    other_root = _issue("some other root CA", ec_key(), None, ca=True, not_before=long_ago,
                        not_after=far_ahead, directory=directory, stem="other-root")
    return TestPKI(root=root, intermediate=intermediate, signer=signer, signer_plain_key=plain,
                   signer_p12=p12, signer_ec=signer_ec, expired=expired,
                   other_signer=other_signer, tsa_root=tsa_root, tsa=tsa,
                   other_root=other_root, passphrase=passphrase,
                   signer_not_after=signer_not_after)
