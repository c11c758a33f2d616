"""PAdES signatures for felixscan PDF reports: `sign_pdf`/`sign_report` (B-B, or B-T with an
RFC 3161 TSA) and `verify_signature`, which reports each check with a reason a person can read.
pyHanko does the PDF and CMS work; PDF/A-2/3 inputs stay PDF/A (see `_KeepVersionSigner`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import hashlib
import logging
import os
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum, StrEnum
from io import BytesIO
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from pyhanko.keys import load_certs_from_pemder_data, load_private_key_from_pemder_data
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.metadata.xmp_xml import MetadataStream
from pyhanko.pdf_utils.misc import PdfError
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.pdf_utils.writer import BasePdfFileWriter
from pyhanko.sign.diff_analysis import ModificationLevel
from pyhanko.sign.fields import InvisSigSettings, MDPPerm, SigFieldSpec, SigSeedSubFilter
from pyhanko.sign.general import SigningError as PyHankoSigningError
from pyhanko.sign.signers import PdfSignatureMetadata, PdfSigner, SimpleSigner
from pyhanko.sign.signers.constants import ESIC_EXTENSION_1
from pyhanko.sign.timestamps import HTTPTimeStamper, TimestampRequestError
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko.sign.validation.errors import SignatureValidationError
from pyhanko.sign.validation.pdf_embedded import EmbeddedPdfSignature
from pyhanko.sign.validation.settings import KeyUsageConstraints
from pyhanko.sign.validation.status import PdfSignatureStatus, SignatureCoverageLevel
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import (
    ExpiredError,
    NotYetValidError,
    PathBuildingError,
    ValidationError,
)
from pyhanko_certvalidator.registry import SimpleCertificateStore

from scanner.core.config import SigningSettings
from scanner.core.errors import SigningError

__all__ = [
    "SIGNATURE_FIELD",
    "Check",
    "SignatureReport",
    "SignerInfo",
    "SigningError",
    "Status",
    "check_signing",
    "load_trust_roots",
    "read_passphrase",
    "sign_pdf",
    "sign_report",
    "verify_signature",
]

StrPath = str | os.PathLike[str]
# asn1crypto ships no type hints; its certificates, as pyHanko takes and returns them, are Any.
_Asn1Cert = Any
_T = TypeVar("_T")
log = logging.getLogger(__name__)

SIGNATURE_FIELD: Final = "FelixscanSignature"
_DIGEST: Final = "sha256"
_PDFAID_NS: Final = "http://www.aiim.org/pdfa/ns/id/"
# A signature needs one of these; pyHanko's own default asks for non_repudiation only, which
# would reject the many signing certificates that carry digitalSignature alone.
_KEY_USAGE: Final = KeyUsageConstraints(key_usage={"digital_signature", "non_repudiation"},
                                        match_all_key_usages=False)


# --- signing as configured ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignerInfo:
    """Who signs, as `check_signing` found it: nothing secret."""

    subject: str  # RFC 4514
    fingerprint: str  # SHA-256 of the signer certificate (DER), hex
    not_after: datetime


def read_passphrase(signing: SigningSettings, *,
                    environ: Mapping[str, str] | None = None) -> bytes | None:
    """The key's passphrase from `signing.passphrase_env` or `signing.passphrase_file`; None
    when neither is set. One trailing line break of a file is dropped (`echo pw > file`, or a
    Secret written with one). Raises SigningError naming the variable or file, never the value.
    """
    env = os.environ if environ is None else environ
    if signing.passphrase_env is not None:
        value = env.get(signing.passphrase_env)
        if not value:
            raise SigningError(f"the environment variable {signing.passphrase_env}, named for "
                               "the signing key's passphrase, is not set or empty")
        return value.encode("utf-8")
    if signing.passphrase_file is not None:
        raw = _read(signing.passphrase_file, "passphrase")
        for ending in (b"\r\n", b"\n"):
            if raw.endswith(ending):
                raw = raw[:-len(ending)]
                break
        if not raw:
            raise SigningError(f"the passphrase file {signing.passphrase_file} is empty")
        return raw
    return None


def check_signing(signing: SigningSettings, *,
                  environ: Mapping[str, str] | None = None) -> SignerInfo:
    """Load the key material as `sign_report` would and check the certificate, signing
    nothing: so a wrong passphrase or an expired certificate fails before a report is
    rendered (the CLI) or when `serve` starts. Raises SigningError."""
    if signing.tsa_url is not None:
        _check_tsa_url(signing.tsa_url)
    creds = _load_credentials(signing.key, signing.cert,
                              read_passphrase(signing, environ=environ), ())
    _check_signer_certificate(creds.cert, _describe_source(signing.key, signing.cert))
    der = creds.cert.public_bytes(serialization.Encoding.DER)
    return SignerInfo(subject=creds.cert.subject.rfc4514_string(),
                      fingerprint=hashlib.sha256(der).hexdigest(),
                      not_after=creds.cert.not_valid_after_utc)


def sign_report(pdf: bytes, *, signing: SigningSettings,
                environ: Mapping[str, str] | None = None, tsa_timeout: float = 10.0) -> bytes:
    """`sign_pdf` with the settings of `report.signing` (or the `report --sign-*` flags)."""
    return sign_pdf(pdf, key_path=signing.key, cert_path=signing.cert,
                    passphrase=read_passphrase(signing, environ=environ),
                    tsa_url=signing.tsa_url, reason=signing.reason,
                    location=signing.location, tsa_timeout=tsa_timeout)


# --- signing ------------------------------------------------------------------------------


def sign_pdf(pdf: bytes, *, key_path: StrPath, cert_path: StrPath | None,
             passphrase: bytes | None, chain_paths: Sequence[StrPath] = (),
             tsa_url: str | None = None, reason: str | None = None,
             location: str | None = None, signer_name: str | None = None,
             tsa_timeout: float = 10.0) -> bytes:
    """Sign `pdf` with an invisible PAdES signature added as an incremental update.

    `key_path` and `cert_path` are a private key and its certificate (PEM or DER); with
    `cert_path` None, `key_path` is a PKCS#12 file holding both. `passphrase` decrypts the
    key (None for an unencrypted one). `chain_paths` are further certificates (intermediate
    CAs) to embed. With `tsa_url` the signature gets an RFC 3161 timestamp (PAdES B-T),
    without it is PAdES B-B. Returns the signed PDF: the input bytes followed by the update.
    Raises SigningError.
    """
    if not pdf.startswith(b"%PDF-"):
        raise SigningError("the input is not a PDF file (no %PDF- header)")
    if tsa_url is not None:
        _check_tsa_url(tsa_url)
    creds = _load_credentials(key_path, cert_path, passphrase, chain_paths)
    _check_signer_certificate(creds.cert, _describe_source(key_path, cert_path))
    signer = SimpleSigner(
        signing_cert=_to_asn1_cert(creds.cert),
        signing_key=load_private_key_from_pemder_data(creds.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), None),
        # unannotated in pyhanko-certvalidator
        cert_registry=SimpleCertificateStore.from_certs(  # type: ignore[no-untyped-call]
            [_to_asn1_cert(c) for c in creds.chain]))
    timestamper = (HTTPTimeStamper(tsa_url, timeout=tsa_timeout)
                   if tsa_url is not None else None)
    meta = PdfSignatureMetadata(
        field_name=SIGNATURE_FIELD, md_algorithm=_DIGEST, subfilter=SigSeedSubFilter.PADES,
        reason=reason, location=location, name=signer_name,
        # A certification signature that allows no changes: PDF viewers then flag any later
        # edit as a violation, the same verdict `verify_signature` gives. PDF/A-3 permits a
        # DocMDP entry in /Perms (ISO 19005-3, 6.1.12).
        certify=True, docmdp_permissions=MDPPerm.NO_CHANGES)
    field = SigFieldSpec(
        sig_field_name=SIGNATURE_FIELD,
        # Zero-sized and off the page, with the print flag: PDF/A wants the print flag and
        # needs no appearance stream for a zero-sized widget (ISO 19005-3, 6.3.2 and 6.3.3);
        # PDF/UA accepts an untagged annotation outside the crop box.
        invis_sig_settings=InvisSigSettings(set_print_flag=True, set_hidden_flag=False,
                                            box_out_of_bounds=True))
    try:
        writer = IncrementalPdfFileWriter(BytesIO(pdf), strict=False)
    except (PdfError, ValueError, KeyError, TypeError) as exc:
        raise SigningError(f"the input is not a readable PDF: {exc}") from exc
    part = _check_input(writer, creds.key)
    pdf_signer = _KeepVersionSigner(meta, signer=signer, timestamper=timestamper,
                                    new_field_spec=field)
    try:
        out = _run(pdf_signer.async_sign_pdf(writer, output=BytesIO()))
    except (TimestampRequestError, aiohttp.ClientError, TimeoutError, OSError) as exc:
        if tsa_url is None:  # only the TSA request does I/O, so this should not happen
            raise SigningError(f"signing failed: {type(exc).__name__}: {exc}") from exc
        # No cause attached: aiohttp's errors may quote the URL, credentials included.
        raise SigningError(_describe_tsa_failure(exc, tsa_url, tsa_timeout)) from None
    except (PyHankoSigningError, PdfError, ValueError, KeyError, TypeError) as exc:
        # pyHanko's messages name structures, not key material; the cause stays attached.
        raise SigningError(f"pyHanko could not sign the PDF: {exc}") from exc
    signed: bytes = out.getvalue()
    if part is not None and _pdfa_part(PdfFileReader(BytesIO(signed), strict=False)) != part:
        # A guard, not an expected path: see _pdfa_part about how pyHanko can lose the XMP.
        raise SigningError(f"signing dropped the PDF/A-{part} identification from the XMP "
                           "metadata; the signed file would not be PDF/A, so none is returned")
    return signed


class _KeepVersionSigner(PdfSigner):
    """A PdfSigner that never raises a PDF 1.x document to PDF 2.0.

    With an ECDSA key on a P-256/384/521 or Brainpool curve, pyHanko 0.38 declares the ISO/TS
    32002 extension, which extends PDF 2.0, and so sets the catalog /Version to 2.0. PDF/A-2
    and PDF/A-3 (and PDF/UA-1) are PDF 1.7 profiles, so that would quietly make the report
    something no PDF/A-3 file can be. PAdES on PDF 1.7 asks only for the ESIC extension, and
    its algorithms (ETSI TS 119 312) include ECDSA, which Acrobat and poppler verify in 1.7
    files; that extension is what is declared here. ISO 32000-1 itself lists only RSA and DSA,
    so RSA keys remain the most conservative choice. PDF 2.0 inputs (PDF/A-4) get pyHanko's
    own behaviour.
    """

    def register_extensions(self, pdf_out: BasePdfFileWriter, *, md_algorithm: str) -> None:
        if pdf_out.output_version >= (2, 0):
            super().register_extensions(pdf_out, md_algorithm=md_algorithm)
            return
        pdf_out.ensure_output_version(version=(1, 7))  # type: ignore[no-untyped-call]
        pdf_out.register_extension(ESIC_EXTENSION_1)


def _check_input(writer: IncrementalPdfFileWriter, key: _PrivateKey) -> int | None:
    """Refuse what cannot be signed well; return the PDF/A part the input claims, if any."""
    reader = writer.prev
    if reader.encrypted:
        raise SigningError("the input PDF is encrypted; felixscan signs only its own reports")
    if reader.embedded_signatures:
        # verify_signature requires the first signature to cover the whole file: a second one
        # would make that impossible, so re-signing is refused rather than producing a report
        # that can never verify.
        raise SigningError("the input PDF is already signed")
    part = _pdfa_part(reader)
    if part == 1:
        # pyHanko compresses the XMP stream and lets the Info dictionary and the XMP disagree
        # on the producer (veraPDF PDF/A-1B rules 6.7.2-2 and 6.7.3-7), and declares PDF 1.7
        # in a PDF 1.4 profile. felixscan does not render PDF/A-1, so say so instead.
        raise SigningError("signing would break PDF/A-1 conformance; render the report as "
                           "PDF/A-3 (or without a PDF/A variant) to sign it")
    if writer.output_version < (2, 0) and isinstance(
            key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise SigningError("EdDSA signatures need PDF 2.0 (ISO/TS 32002) and this PDF is "
                           f"version {'.'.join(map(str, writer.output_version))}; use an RSA "
                           "or ECDSA key")
    return part


def _pdfa_part(reader: PdfFileReader) -> int | None:
    """The PDF/A part (1, 2, 3, 4) the document's XMP metadata claims, if any."""
    try:
        root = reader.root
        if "/Metadata" not in root:
            return None
        # root["/Metadata"], not .get(): only item access dereferences it as a MetadataStream,
        # and pyHanko caches whichever object it read first. A plain StreamObject in that
        # cache makes the signer replace the whole XMP packet with a new one holding only
        # ModifyDate and Producer, and the PDF/A identification is gone.
        meta = root["/Metadata"]
        if not isinstance(meta, MetadataStream):
            return None
        for structure in meta.xmp:
            for name, value in structure:
                if name.ns == _PDFAID_NS and name.local_name == "part":
                    return int(str(value.value))
    except (PdfError, ValueError, KeyError, TypeError):
        # Unreadable metadata is not ours to judge here; signing goes on as for any PDF.
        log.debug("could not read the XMP metadata of the input PDF", exc_info=True)
    return None


def _describe_source(key_path: StrPath, cert_path: StrPath | None) -> str:
    return os.fspath(key_path) if cert_path is None else os.fspath(cert_path)


def _check_signer_certificate(cert: x509.Certificate, source: str) -> None:
    now = datetime.now(UTC)
    subject = cert.subject.rfc4514_string()
    if now < cert.not_valid_before_utc:
        raise SigningError(f"the signing certificate {subject} ({source}) is not valid before "
                           f"{_fmt(cert.not_valid_before_utc)}")
    if now > cert.not_valid_after_utc:
        raise SigningError(f"the signing certificate {subject} ({source}) expired on "
                           f"{_fmt(cert.not_valid_after_utc)}")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not (usage.digital_signature or usage.content_commitment):
        raise SigningError(f"the certificate {subject} ({source}) may not sign: its key usage "
                           "has neither digitalSignature nor nonRepudiation")


def _check_tsa_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SigningError(f"the TSA URL {_redact(url)!r} is not an http:// or https:// URL")


def _redact(url: str) -> str:
    """`url` without a password, for messages: TSA URLs may carry basic-auth credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _describe_tsa_failure(exc: BaseException, url: str, timeout: float) -> str:
    where = f"the timestamp server {_redact(url)}"
    chain = list(_exception_chain(exc))
    for e in chain:
        if isinstance(e, TimeoutError):  # asyncio's and aiohttp's timeouts are TimeoutError
            return f"{where} did not answer within {timeout:g} s"
    for e in chain:
        if isinstance(e, aiohttp.ContentTypeError):
            return f"{where} did not answer with an RFC 3161 timestamp reply ({e.message})"
        if isinstance(e, aiohttp.ClientResponseError):
            return f"{where} answered HTTP {e.status} {e.message}".rstrip()
        if isinstance(e, aiohttp.ClientConnectorError):
            return f"{where} is unreachable: {e.os_error.strerror or e.os_error}"
        if isinstance(e, ConnectionRefusedError) or (
                isinstance(e, OSError) and e.errno == errno.ECONNREFUSED):
            return f"{where} is unreachable: connection refused"
        if isinstance(e, aiohttp.ClientError):
            return f"{where} could not be reached: {type(e).__name__}: {e}"
    if isinstance(exc, TimestampRequestError):
        # e.g. "Timestamp server refused our request: ..." or a bad nonce
        return f"{where} gave no usable timestamp: {exc}"
    return f"the timestamp request to {_redact(url)} failed: {type(exc).__name__}: {exc}"


def _exception_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# --- key material -------------------------------------------------------------------------

_PrivateKey = (rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
               | ed448.Ed448PrivateKey)


@dataclass(frozen=True, slots=True)
class _Credentials:
    key: _PrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]


def _load_credentials(key_path: StrPath, cert_path: StrPath | None, passphrase: bytes | None,
                      chain_paths: Sequence[StrPath]) -> _Credentials:
    extra = [c for path in chain_paths for c in _load_certificates(path, "certificate chain")]
    if cert_path is None:
        key, cert, bundled = _load_pkcs12(key_path, passphrase)
        extra = bundled + extra
    else:
        key = _load_private_key(key_path, passphrase)
        certs = _load_certificates(cert_path, "certificate")
        cert, extra = certs[0], certs[1:] + extra  # a PEM bundle: the signer's first
    if _spki(key.public_key()) != _spki(cert.public_key()):
        where = (f"the PKCS#12 file {os.fspath(key_path)}" if cert_path is None else
                 f"the key {os.fspath(key_path)}")
        raise SigningError(f"{where} does not match the certificate "
                           f"{cert.subject.rfc4514_string()} (different public keys)")
    return _Credentials(key, cert, tuple(extra))


def _read(path: StrPath, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise SigningError(f"cannot read the {what} file {os.fspath(path)}: "
                           f"{exc.strerror or type(exc).__name__}") from None


def _load_private_key(path: StrPath, passphrase: bytes | None) -> _PrivateKey:
    data = _read(path, "private key")
    where = f"the private key file {os.fspath(path)}"
    if _looks_like_pkcs12(data):
        raise SigningError(f"{where} is a PKCS#12 file, which holds its own certificate: give "
                           "it alone, without a certificate file")
    loader = (serialization.load_pem_private_key if b"-----BEGIN" in data
              else serialization.load_der_private_key)
    # The causes are dropped ("from None") throughout: a parser's message is no place to
    # risk echoing key bytes, and ours says what went wrong.
    try:
        key = loader(data, None)
    except TypeError:  # with no password given, cryptography's way of saying "encrypted"
        if passphrase is None:
            raise SigningError(f"{where} is encrypted and needs a passphrase") from None
        try:
            key = loader(data, passphrase)
        except ValueError:
            raise SigningError(f"wrong passphrase for {where}") from None
        except (TypeError, UnsupportedAlgorithm):
            raise SigningError(f"{where} is encrypted in a way that cannot be read") from None
    except ValueError:
        raise SigningError(f"{where} holds no readable private key (PEM or DER)") from None
    except UnsupportedAlgorithm:
        raise SigningError(f"{where} holds a private key of an unsupported type") from None
    else:
        if passphrase is not None:
            # Harmless, but worth a log line: the operator may believe the key is protected.
            log.warning("%s is not encrypted; the passphrase given was not needed", where)
    return _supported_key(key, where)


def _load_pkcs12(path: StrPath, passphrase: bytes | None,
                 ) -> tuple[_PrivateKey, x509.Certificate, list[x509.Certificate]]:
    data = _read(path, "PKCS#12")
    where = f"the PKCS#12 file {os.fspath(path)}"
    if not _looks_like_pkcs12(data):
        raise SigningError(f"{where} is not a PKCS#12 (.p12/.pfx) file")
    try:
        key, cert, others = pkcs12.load_key_and_certificates(data, passphrase)
    except ValueError:
        # cryptography does not tell a wrong password from a damaged file, but the file
        # starts like a PFX (checked above), so the password is by far the likelier culprit.
        if passphrase is None:
            raise SigningError(f"{where} is encrypted and needs a passphrase") from None
        raise SigningError(f"wrong passphrase for {where} (or the file is damaged)") from None
    except (TypeError, UnsupportedAlgorithm):
        raise SigningError(f"{where} uses an unsupported algorithm") from None
    if key is None or cert is None:
        raise SigningError(f"{where} must hold both a private key and its certificate")
    return _supported_key(key, where), cert, list(others)


def _looks_like_pkcs12(data: bytes) -> bool:
    """A DER SEQUENCE whose first element is INTEGER 3: the start of a PFX (RFC 7292, 4).

    Enough to tell "this is a PKCS#12 file" (so a failure to open it is the passphrase) from
    "this is some other file", which cryptography reports with the same ValueError.
    """
    if len(data) < 4 or data[0] != 0x30:
        return False
    first = data[1]
    offset = 2 if first < 0x80 else 2 + (first & 0x7F)
    return data[offset:offset + 3] == b"\x02\x01\x03"


def _supported_key(key: object, where: str) -> _PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                  | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key
    raise SigningError(f"{where} holds a {type(key).__name__.lstrip('_')}; "
                       "use an RSA, ECDSA or EdDSA key")


def _load_certificates(path: StrPath, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = (x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                 else [x509.load_der_x509_certificate(data)])
    except ValueError:
        raise SigningError(f"the {what} file {os.fspath(path)} holds no readable X.509 "
                           "certificate (PEM or DER)") from None
    return certs


def _spki(public_key: Any) -> bytes:
    spki: bytes = public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return spki


def _to_asn1_cert(cert: x509.Certificate) -> _Asn1Cert:
    return next(iter(load_certs_from_pemder_data(cert.public_bytes(serialization.Encoding.DER))))


def _to_pyca_cert(cert: _Asn1Cert) -> x509.Certificate:
    return x509.load_der_x509_certificate(cert.dump())


# --- verification -------------------------------------------------------------------------


class Status(StrEnum):
    """The outcome of one item of a SignatureReport."""

    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "fail"
    ABSENT = "absent"  # an optional item the PDF does not have (a timestamp)
    INFO = "info"  # a stated fact nothing proves (the signer's own clock)
    NOT_CHECKED = "not checked"  # nothing to check it on (no signature, no trust roots)


@dataclass(frozen=True, slots=True)
class Check:
    """One item of a SignatureReport: its status and why, in words for a person."""

    status: Status
    reason: str


# What reading a damaged PDF or CMS structure raises (asn1crypto: ValueError, TypeError).
_PARSE_ERRORS = (SignatureValidationError, PdfError, ValueError, KeyError, TypeError,
                 AttributeError, IndexError)
# Why a timestamp's TSA is not trusted, by pyHanko's AdES sub-indication.
_TSA_TRUST_PROBLEMS: Final = {
    "NO_CERTIFICATE_CHAIN_FOUND": "its certificate does not chain to any of the trust roots",
    "OUT_OF_BOUNDS_NO_POE": "its certificate is not valid at the time of this check",
    "NOT_YET_VALID": "its certificate is not valid yet",
    "CHAIN_CONSTRAINTS_FAILURE": "its certificate may not issue timestamps (no timeStamping "
                                 "key purpose) or breaks a constraint of its chain",
    "CRYPTO_CONSTRAINTS_FAILURE": "it uses an algorithm that is no longer accepted",
    "REVOKED_NO_POE": "its certificate is revoked",
}


@dataclass(frozen=True, slots=True)
class SignatureReport:
    """What `verify_signature` found; `ok` only when every verdict passed."""

    signature: Check  # the PDF has a (readable) signature
    coverage: Check  # it covers the whole file: nothing was appended after signing
    integrity: Check  # the signed bytes and the signature value verify
    trust: Check  # the signer certificate chains to one of the trust roots
    validity: Check  # the signer certificate was valid when the signature was made
    timestamp: Check  # an RFC 3161 signature timestamp, valid and from a trusted TSA
    signer: Check  # INFO: the signer certificate's subject
    signing_time: Check  # PASS when a trusted timestamp proves it, INFO when only claimed
    signer_subject: str | None = None  # RFC 4514
    signed_at: datetime | None = None  # the timestamp's time if it passed, else the claimed
    timestamp_time: datetime | None = None
    timestamp_authority: str | None = None
    signature_count: int = 0
    checked_at: datetime | None = None
    # The file has a signature, readable or not; false for a plain unsigned PDF, whose
    # report then says so in `signature` and has every other item not checked.
    present: bool = True

    @property
    def ok(self) -> bool:
        verdicts = (self.signature, self.coverage, self.integrity, self.trust, self.validity)
        return (all(c.status is Status.PASS for c in verdicts)
                and self.timestamp.status in (Status.PASS, Status.ABSENT))

    def checks(self) -> tuple[tuple[str, Check], ...]:
        """Every item with a label, in the order a person reads them."""
        return (("signature", self.signature), ("coverage", self.coverage),
                ("integrity", self.integrity), ("trust", self.trust),
                ("certificate validity", self.validity), ("timestamp", self.timestamp),
                ("signer", self.signer), ("signing time", self.signing_time))

    def lines(self) -> list[str]:
        """One line per item, e.g. ``integrity: pass - the signed bytes ...``."""
        return [f"{label}: {check.status} - {check.reason}" for label, check in self.checks()]


def verify_signature(pdf: bytes, *, trust_roots: Sequence[StrPath] | None,
                     now: datetime | None = None,
                     require_timestamp: bool = False) -> SignatureReport:
    """Check the (first) signature of `pdf`; see SignatureReport for the items.

    `trust_roots` are files of CA certificates (PEM, possibly several, or DER) that the
    signer's and the TSA's certificates must chain to; None leaves trust unchecked (and the
    report not ok). `now` is the validation time (default: the current time). A missing
    timestamp is ABSENT, or FAIL with `require_timestamp`. Revocation is not checked: the
    check is offline and nothing is fetched. Raises SigningError only for an unreadable
    trust-root file; everything about the PDF is in the report.
    """
    checked_at = now if now is not None else datetime.now(UTC)
    if checked_at.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    roots = (None if trust_roots is None
             else [_to_asn1_cert(c) for c in load_trust_roots(trust_roots)])
    return _run(_verify(pdf, roots, checked_at, require_timestamp))


def load_trust_roots(paths: Sequence[StrPath]) -> list[x509.Certificate]:
    """The CA certificates in `paths` (PEM files of one or more, or DER); raises SigningError
    naming a file that cannot be read or holds no certificate."""
    return [c for path in paths for c in _load_certificates(path, "trust root")]


def _unsigned(reason: str, checked_at: datetime, count: int = 0,
              why_not: str = "there is no readable signature", *,
              present: bool = True) -> SignatureReport:
    rest = Check(Status.NOT_CHECKED, why_not)
    return SignatureReport(signature=Check(Status.FAIL, reason), coverage=rest, integrity=rest,
                           trust=rest, validity=rest, timestamp=rest, signer=rest,
                           signing_time=rest, signature_count=count, checked_at=checked_at,
                           present=present)


def _has_signature_dictionary(pdf: bytes) -> bool:
    # A signature dictionary is never inside an object stream (its /Contents must sit at a
    # fixed offset), so its /ByteRange is always in the file as written.
    return b"/ByteRange" in pdf


def _one_line(exc: BaseException) -> str:
    """An exception as one line: asn1crypto's messages span several."""
    return " ".join(str(exc).split()) or type(exc).__name__


async def _verify(pdf: bytes, roots: list[_Asn1Cert] | None, checked_at: datetime,
                  require_timestamp: bool) -> SignatureReport:
    if not pdf.startswith(b"%PDF-"):
        return _unsigned("not a PDF file (no %PDF- header)", checked_at, present=False)
    try:
        # Strict: among other things, pyHanko then refuses to validate signatures in files with
        # hybrid cross-references, a known way to show different content to different readers.
        reader = PdfFileReader(BytesIO(pdf), strict=True)
        signatures = reader.embedded_regular_signatures
    except _PARSE_ERRORS as exc:
        # e.g. a /Contents that no longer parses as CMS: nothing to verify against
        return _unsigned(f"no readable signature: {_one_line(exc)}", checked_at,
                         present=_has_signature_dictionary(pdf))
    if not signatures:
        if _has_signature_dictionary(pdf):
            return _unsigned("the file holds a signature dictionary that no signature field "
                             "uses: the signature was taken out of the form", checked_at)
        return _unsigned("the PDF has no signature", checked_at, present=False)
    # The first signature is felixscan's, made over the report as rendered; anything after it
    # (another signature included) is a later change that its coverage check reports.
    emb: EmbeddedPdfSignature = signatures[0]
    signature = Check(Status.PASS, f"signature field {emb.field_name!r}"
                      + (f" (the first of {len(signatures)})" if len(signatures) > 1 else ""))
    try:
        # asn1crypto parses lazily, so a damaged CMS blob can fail anywhere in here
        status = await async_validate_pdf_signature(
            emb, signer_validation_context=_validation_context(roots, emb, checked_at),
            key_usage_settings=_KEY_USAGE)
        cert = _to_pyca_cert(emb.signer_cert)
    except _PARSE_ERRORS as exc:
        broken = Check(Status.FAIL, f"the signature cannot be validated: {_one_line(exc)}")
        return dataclasses.replace(
            _unsigned("", checked_at, len(signatures), "the signature could not be read"),
            signature=signature, integrity=broken)
    subject = cert.subject.rfc4514_string()
    timestamp, ts_time, tsa = _timestamp_check(status, require_timestamp,
                                               roots_given=roots is not None)
    proven = timestamp.status is Status.PASS and ts_time is not None
    claimed = status.signer_reported_dt
    reference = ts_time if proven and ts_time is not None else checked_at
    if proven:
        signing_time = Check(Status.PASS, f"{_fmt(reference)}, proven by the timestamp of {tsa}")
    elif claimed is not None:
        signing_time = Check(Status.INFO, f"{_fmt(claimed)}, as claimed by the signer's clock "
                             "(no trusted timestamp proves it)")
    else:
        signing_time = Check(Status.NOT_CHECKED, "the signature states no signing time")
    trust = (Check(Status.NOT_CHECKED, "no trust roots were given, so nothing "
                               "shows who made the signature")
             if roots is None else await _trust_check(emb, cert, roots, reference))
    return SignatureReport(
        signature=signature, coverage=_coverage_check(status, emb, reader, len(pdf)),
        integrity=_integrity_check(status), trust=trust,
        validity=_validity_check(cert, reference, proven, claimed, checked_at),
        timestamp=timestamp, signer=Check(Status.INFO, subject), signing_time=signing_time,
        signer_subject=subject, signed_at=reference if proven else claimed,
        timestamp_time=ts_time, timestamp_authority=tsa, signature_count=len(signatures),
        checked_at=checked_at)


def _validation_context(roots: list[_Asn1Cert] | None, emb: EmbeddedPdfSignature,
                        moment: datetime) -> ValidationContext:
    # An explicit (possibly empty) root list: pyHanko would otherwise fall back to the
    # operating system's TLS roots. No fetching: verification stays offline, and revocation
    # is "soft-fail" because the certificates may name no CRL or OCSP responder.
    return ValidationContext(trust_roots=list(roots or ()), other_certs=emb.other_embedded_certs,
                             moment=moment, allow_fetching=False, revocation_mode="soft-fail")


def _coverage_check(status: PdfSignatureStatus, emb: EmbeddedPdfSignature,
                    reader: PdfFileReader, size: int) -> Check:
    coverage = status.coverage
    if coverage is SignatureCoverageLevel.ENTIRE_FILE:
        return Check(Status.PASS, f"the signature covers the whole file ({size} bytes)")
    if coverage is SignatureCoverageLevel.ENTIRE_REVISION:
        _, _, start2, len2 = (int(x) for x in emb.byte_range)
        later = reader.xrefs.total_revisions - 1 - emb.signed_revision
        return Check(Status.FAIL, f"{later} incremental update(s), {size - start2 - len2} "
                     f"bytes, were appended after signing: "
                     f"{_describe_modifications(status.modification_level)}")
    return Check(Status.FAIL, "the signed byte range does not cover the file as a signature "
                 f"should (pyHanko coverage level {coverage.name if coverage else None})")


def _describe_modifications(level: ModificationLevel | None) -> str:
    if level is ModificationLevel.LTA_UPDATES:
        return "they only add validation data or document timestamps"
    if level is ModificationLevel.FORM_FILLING:
        return "they fill in form fields or add signatures"
    if level is ModificationLevel.ANNOTATIONS:
        return "they add or change annotations"
    if level is None:
        return "their nature was not analysed"
    return "they change the document's content or structure"


def _integrity_check(status: PdfSignatureStatus) -> Check:
    if not status.intact:
        return Check(Status.FAIL, "the signed bytes were changed after signing: their "
                     f"{status.md_algorithm} digest no longer matches the signature")
    if not status.valid:
        return Check(Status.FAIL, "the signature value does not verify with the signer "
                     "certificate's public key")
    return Check(Status.PASS, f"the signed bytes match the signature ({status.md_algorithm}, "
                 f"{status.pkcs7_signature_mechanism})")


def _timestamp_check(status: PdfSignatureStatus, required: bool, *, roots_given: bool,
                     ) -> tuple[Check, datetime | None, str | None]:
    ts = status.timestamp_validity
    if ts is None:
        reason = "the signature has no RFC 3161 timestamp"
        return Check(Status.FAIL if required else Status.ABSENT, reason), None, None
    tsa = _to_pyca_cert(ts.signing_cert).subject.rfc4514_string()
    when = ts.timestamp
    if not (ts.intact and ts.valid):
        return Check(Status.FAIL, f"the timestamp from {tsa} does not verify: it was altered "
                     "or is not for this signature"), when, tsa
    if not ts.trusted and not roots_given:
        # Like the signer: with no trust roots, nothing says whether this TSA is trusted.
        return Check(Status.NOT_CHECKED, f"the timestamp from {tsa} at {_fmt(when)} is intact, "
                     "but no trust roots were given, so nothing shows the TSA is one to "
                     "trust"), when, tsa
    if not ts.trusted:
        indic = ts.trust_problem_indic
        name = indic.name if isinstance(indic, Enum) else "NO_CERTIFICATE_CHAIN_FOUND"
        why = _TSA_TRUST_PROBLEMS.get(name, f"pyHanko reports {name}")
        return Check(Status.FAIL, f"the timestamp from {tsa} at {_fmt(when)} is not "
                     f"trusted: {why}"), when, tsa
    return Check(Status.PASS, f"{_fmt(when)}, from the TSA {tsa}"), when, tsa


async def _trust_check(emb: EmbeddedPdfSignature, cert: x509.Certificate,
                       roots: list[_Asn1Cert], moment: datetime) -> Check:
    subject = cert.subject.rfc4514_string()
    try:
        path = await _validate_path(emb, roots, moment)
        note = ""
    except (ExpiredError, NotYetValidError) as exc:
        if not exc.is_ee_cert:
            return Check(Status.FAIL, f"the chain of {subject} is not valid at "
                         f"{_fmt(moment)}: {exc.failure_msg}")
        # The signer certificate's own dates are the validity check's business; judge the
        # chain at the edge of the certificate's lifetime so the two verdicts stay separate.
        edge = min(max(moment, cert.not_valid_before_utc), cert.not_valid_after_utc)
        try:
            path = await _validate_path(emb, roots, edge)
        except (PathBuildingError, ValidationError) as again:
            return Check(Status.FAIL, f"{subject} is not trusted: {_certvalidator_msg(again)}")
        note = (f" (chain checked at {_fmt(edge)}, within the certificate's validity; "
                "see certificate validity)")
    except PathBuildingError:
        given = "; ".join(_to_pyca_cert(r).subject.rfc4514_string() for r in roots) or "none"
        return Check(Status.FAIL, f"{subject}, issued by {cert.issuer.rfc4514_string()}, does "
                     f"not chain to any of the trust roots given ({given})")
    except ValidationError as exc:
        return Check(Status.FAIL, f"{subject} is not trusted: {_certvalidator_msg(exc)}")
    try:
        _KEY_USAGE.validate(emb.signer_cert)
    except ValidationError as exc:
        return Check(Status.FAIL, f"{subject} may not sign documents: {exc.failure_msg}")
    # [root, intermediates..., signer]; roots are given as certificates, so the first is one
    names = [_to_pyca_cert(c).subject.rfc4514_string() for c in path.iter_certs(True)]
    anchor, via = names[0], names[1:-1]
    return Check(Status.PASS, f"chains to the trust root {anchor}"
                 + (f" via {', '.join(via)}" if via else "") + note)


async def _validate_path(emb: EmbeddedPdfSignature, roots: list[_Asn1Cert],
                         moment: datetime) -> Any:
    context = _validation_context(roots, emb, moment)
    validator = CertificateValidator(emb.signer_cert, emb.other_embedded_certs, context)
    return await validator.async_validate_path()


def _certvalidator_msg(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.failure_msg.split())
    return _one_line(exc)


def _validity_check(cert: x509.Certificate, reference: datetime, proven: bool,
                    claimed: datetime | None, checked_at: datetime) -> Check:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    span = f"valid from {_fmt(start)} to {_fmt(end)}"
    when = ("the signing time the timestamp proves" if proven else
            "the time of this check (no trusted timestamp proves when it signed)")
    # what the signer's own clock says, when nothing better is known
    said = ("" if proven or claimed is None else
            f"; the signer's clock says it signed at {_fmt(claimed)}")
    if reference > end:
        return Check(Status.FAIL, f"the signer certificate expired on {_fmt(end)}, before "
                     f"{when}, {_fmt(reference)}{said}")
    if reference < start:
        return Check(Status.FAIL, f"the signer certificate is not valid before {_fmt(start)}, "
                     f"after {when}, {_fmt(reference)}{said}")
    if claimed is not None and not start - _CLOCK_SKEW <= claimed <= end + _CLOCK_SKEW:
        return Check(Status.FAIL, f"{span}, but the signer claims to have signed at "
                     f"{_fmt(claimed)}, outside that period")
    if proven:
        return Check(Status.PASS, f"{span}, which includes the timestamped signing time")
    return Check(Status.PASS, f"{span}, which includes the time of this check "
                 f"({_fmt(checked_at)}) and the signing time the signer claims")


_CLOCK_SKEW: Final = timedelta(minutes=5)  # a signer's clock may be a little off


# --- helpers ------------------------------------------------------------------------------


def _fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run one of pyHanko's coroutines to completion from synchronous code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False  # the usual case: run it here (outside the except, for clean tracebacks)
    else:
        in_loop = True
    if not in_loop:
        return asyncio.run(coro)
    # Called from a thread that runs an event loop (a Starlette handler, say): asyncio.run
    # cannot nest, so the work gets a loop of its own in a worker thread. Async callers
    # should rather use run_in_threadpool: this blocks their loop until it is done.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()

