"""Signed PDF reports: `reports.signing` (PAdES B-B and B-T against a loopback TSA, PEM and
PKCS#12, PDF/A-3b kept, pdfsig agreeing), `verify_report` and `felixscan report verify` (a page
removed, a byte edited, an update after signing, a wrong root, an expired signer, unsigned
reports edited), `report --sign-*`, `report.signing` in the config, and signed downloads."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives import serialization
from pyhanko.keys import load_certs_from_pemder, load_private_key_from_pemder
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.fields import SigSeedSubFilter
from pyhanko.sign.general import SigningError as PyHankoSigningError
from pyhanko.sign.signers import PdfSignatureMetadata, PdfSigner, SimpleSigner
from pyhanko_certvalidator.registry import SimpleCertificateStore
from pypdf import PdfReader, PdfWriter
from pypdf.generic import DecodedStreamObject, NameObject

from reports import Outcome, ReportVerification, build_report, verify_report
from reports.cache import ReportCache
from reports.integrity import ATTACHMENT_NAME
from reports.signing import (
    SIGNATURE_FIELD,
    SignatureReport,
    SigningError,
    Status,
    check_signing,
    read_passphrase,
    sign_pdf,
    verify_signature,
)
from scanner.app.cli import main
from scanner.core.config import SigningSettings, load_settings
from scanner.core.errors import ConfigError, ReportError
from scanner.db.store import Store
from scanner.web.app import Auth, create_app
from tests.helpers.paths import ROOT
from tests.helpers.pki import SIGNER_CN, SIGNER_EC_CN, TSA_CN, TestPKI, make_pki
from tests.helpers.tsa import LoopbackTSA, closed_port_url, fixed_answer_server, silent_server
from tests.reports.test_reports import NOW, PERIOD, populate
from tests.web.test_web import TOKEN, FakeSchedule, fetch, served

PASSPHRASE = b"correct horse battery staple 7%"
WRONG_PASSPHRASE = b"Tr0ub4dor&3-but-not-this-one"
PASS_ENV = "FELIXSCAN_TEST_SIGN_PASSPHRASE"
PERIOD_FLAGS = ("--since", str(PERIOD["since"]), "--until", str(PERIOD["until"]))
CHECKS = ["embedded data", "signature", "coverage", "integrity", "trust",
          "certificate validity", "timestamp", "pages"]
PDFSIG = shutil.which("pdfsig")
needs_pdfsig = pytest.mark.skipif(PDFSIG is None, reason="poppler's pdfsig is not installed")

# A small document with what reports/render.py puts in the head, for the tests of PDF variants
# (a real report takes seconds to lay out in each).
SMALL_HTML = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Felix metrics endpoint compliance, 2026-01-01 to 2026-01-31</title>
<meta name="keywords" content="felixscan, compliance, calico">
<meta name="generator" content="felixscan">
<style>@page {{ size: A4 }} body {{ font-family: sans-serif }}</style></head>
<body><h1>Compliance report</h1><p>All 3 nodes of prod-east are compliant.</p>
<p style="break-before: page">Page two: the evidence ({variant}).</p></body></html>"""


def _small_pdf(pdf_variant: str | None) -> bytes:
    import weasyprint

    attachment = weasyprint.Attachment(string=b'{"compliant":true}', name=ATTACHMENT_NAME,
                                       description="felixscan report data",
                                       relationship="Data")
    pdf = weasyprint.HTML(string=SMALL_HTML.format(variant=pdf_variant)).write_pdf(
        attachments=[attachment], pdf_variant=pdf_variant)
    assert isinstance(pdf, bytes)
    return pdf


# --- fixtures: a test PKI, a loopback TSA, a real report and signed copies ------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"), PASSPHRASE)


@pytest.fixture(scope="session")
def tsa(pki: TestPKI) -> Iterator[LoopbackTSA]:
    server = LoopbackTSA(pki.tsa.cert, pki.tsa.key, [pki.tsa_root.cert])
    yield server
    server.close()


@pytest.fixture(scope="session")
def roots(pki: TestPKI) -> list[Path]:
    """The trust roots an auditor of felixscan reports would give: ours and the TSA's."""
    return [pki.root.cert_path, pki.tsa_root.cert_path]


@pytest.fixture(scope="session")
def chain_pem(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The signer's certificate with its issuing CA, as CAs hand them out: `--sign-cert`."""
    path = tmp_path_factory.mktemp("chain") / "signer-chain.pem"
    path.write_bytes(pki.signer.cert_path.read_bytes() + pki.intermediate.cert_path.read_bytes())
    return path


@pytest.fixture(scope="session")
def report_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database of tests/reports/test_reports.py: two clusters over ten days."""
    url = f"sqlite:///{tmp_path_factory.mktemp('signing-db') / 'felixscan.db'}"
    with Store(url) as store:
        populate(store)
    return url


@pytest.fixture(scope="session")
def report_pdf(report_db: str, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real report, PDF/A-3b, unsigned."""
    out = tmp_path_factory.mktemp("report") / "report.pdf"
    with Store(report_db) as store:
        build_report(store, fmt="pdf", out=out, pdf_variant="pdf/a-3b", now=NOW, **PERIOD)
    return out.read_bytes()


def sign_with(pki: TestPKI, pdf: bytes, kind: str, tsa_url: str | None = None) -> bytes:
    """Sign as the app would: RSA key + cert as PEM, or the ECDSA PKCS#12 file."""
    common: dict[str, Any] = {
        "passphrase": PASSPHRASE, "tsa_url": tsa_url, "reason": "felixscan compliance report",
        "location": "ci.example.internal", "signer_name": "felixscan"}
    if kind == "pem":
        assert pki.signer.key_path is not None
        return sign_pdf(pdf, key_path=pki.signer.key_path, cert_path=pki.signer.cert_path,
                        chain_paths=[pki.intermediate.cert_path], **common)
    return sign_pdf(pdf, key_path=pki.signer_p12, cert_path=None, **common)


SIGNED_KINDS = [("pem", False), ("pem", True), ("p12", False), ("p12", True)]


@pytest.fixture(scope="session")
def signed_set(pki: TestPKI, tsa: LoopbackTSA, report_pdf: bytes) -> dict[tuple[str, bool], bytes]:
    return {(kind, with_tsa): sign_with(pki, report_pdf, kind, tsa.url if with_tsa else None)
            for kind, with_tsa in SIGNED_KINDS}


@pytest.fixture(params=SIGNED_KINDS, ids=[f"{k}-{'BT' if t else 'BB'}" for k, t in SIGNED_KINDS])
def signed(request: pytest.FixtureRequest,
           signed_set: dict[tuple[str, bool], bytes]) -> tuple[str, bool, bytes]:
    kind, with_tsa = request.param
    return kind, with_tsa, signed_set[(kind, with_tsa)]


def failed(report: SignatureReport) -> dict[str, str]:
    return {label: check.reason for label, check in report.checks()
            if check.status is Status.FAIL}


def pdfsig(path: Path, *options: str) -> str:
    """pdfsig's report. -no-ocsp always: the tests never go on the network (our certificates
    name no OCSP responder anyway). pdfsig exits 0 whether or not a signature is valid, so
    only its text can be asserted on."""
    assert PDFSIG is not None
    done = subprocess.run([PDFSIG, "-no-ocsp", *options, str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    return done.stdout + done.stderr


# --- good signatures ----------------------------------------------------------------------


def test_signed_report_verifies(signed: tuple[str, bool, bytes], report_pdf: bytes,
                                roots: list[Path], tsa: LoopbackTSA) -> None:
    kind, with_tsa, pdf = signed
    report = verify_signature(pdf, trust_roots=roots)
    assert report.ok, report.lines()
    assert failed(report) == {}
    assert pdf.startswith(report_pdf)  # an incremental update: the report's bytes untouched
    assert report.signature_count == 1
    subject = report.signer_subject or ""
    assert (SIGNER_CN if kind == "pem" else SIGNER_EC_CN) in subject
    assert report.coverage.reason.startswith("the signature covers the whole file")
    assert "felixscan test root CA" in report.trust.reason
    assert "felixscan test issuing CA" in report.trust.reason
    now = datetime.now(UTC)
    assert report.signed_at is not None and abs(report.signed_at - now) < timedelta(minutes=5)
    if with_tsa:
        assert report.timestamp.status is Status.PASS
        assert report.timestamp_authority is not None and TSA_CN in report.timestamp_authority
        assert report.timestamp_time is not None
        assert abs(report.timestamp_time - now) < timedelta(minutes=5)
        assert report.signing_time.status is Status.PASS
        assert "proven by the timestamp" in report.signing_time.reason
    else:
        assert report.timestamp.status is Status.ABSENT
        assert report.signing_time.status is Status.INFO
        assert "claimed by the signer" in report.signing_time.reason
    lines = report.lines()
    assert [line.split(":")[0] for line in lines] == [
        "signature", "coverage", "integrity", "trust", "certificate validity", "timestamp",
        "signer", "signing time"]


def test_timestamp_comes_from_the_loopback_tsa(pki: TestPKI, report_pdf: bytes,
                                               roots: list[Path]) -> None:
    server = LoopbackTSA(pki.tsa.cert, pki.tsa.key, [pki.tsa_root.cert])
    try:
        assert server.url.startswith("http://127.0.0.1:")
        pdf = sign_with(pki, report_pdf, "pem", server.url)
        # one request to size the signature, one for the real timestamp
        assert server.requests == 2
    finally:
        server.close()
    assert verify_signature(pdf, trust_roots=roots).timestamp.status is Status.PASS


def test_signature_dictionary(signed_set: dict[tuple[str, bool], bytes]) -> None:
    reader = PdfReader(BytesIO(signed_set[("pem", True)]))
    field = next(f for f in (reader.get_fields() or {}).values()
                 if f.get("/T") == SIGNATURE_FIELD)
    sig = field["/V"]
    assert sig["/SubFilter"] == "/ETSI.CAdES.detached"  # PAdES
    assert sig["/Reason"] == "felixscan compliance report"
    assert sig["/Location"] == "ci.example.internal"
    assert sig["/Name"] == "felixscan"
    # certification signature, no changes allowed
    root: Any = reader.trailer["/Root"]
    assert root["/Perms"]["/DocMDP"]["/Reference"][0]["/TransformParams"]["/P"] == 1


def test_attachment_survives_signing(signed_set: dict[tuple[str, bool], bytes],
                                     report_pdf: bytes) -> None:
    def files(pdf: bytes) -> dict[str, bytes]:
        return {f.name: f.content for f in PdfReader(BytesIO(pdf)).attachment_list}

    assert files(signed_set[("p12", True)]) == files(report_pdf)
    assert list(files(report_pdf)) == [ATTACHMENT_NAME]


@pytest.mark.parametrize("kind", ["pem", "p12"])
def test_pdfa3b_stays_pdfa3b(pki: TestPKI, tsa: LoopbackTSA, report_pdf: bytes,
                             kind: str) -> None:
    signed = sign_with(pki, report_pdf, kind, tsa.url)
    assert pdfa3_problems(report_pdf, signed) == []


def test_pdfa_checker_catches_a_version_bump(pki: TestPKI, report_pdf: bytes) -> None:
    # What plain pyHanko does with an ECDSA P-256 key: declare ISO/TS 32002 and PDF 2.0.
    signed = _plain_pyhanko_sign(pki, report_pdf)
    problems = pdfa3_problems(report_pdf, signed)
    assert any(p.startswith("version: catalog /Version /2.0") for p in problems), problems


def test_ecdsa_signature_keeps_pdf_17(signed_set: dict[tuple[str, bool], bytes]) -> None:
    reader = PdfReader(BytesIO(signed_set[("p12", False)]))
    root: Any = reader.trailer["/Root"]
    assert "/Version" not in root or root["/Version"] <= "/1.7"
    assert "/ESIC" in root["/Extensions"]  # PAdES on PDF 1.7
    assert "/ISO_" not in root["/Extensions"]


@pytest.mark.parametrize("variant", [None, "pdf/a-3u", "pdf/a-4u", "pdf/ua-1"])
def test_other_variants_can_be_signed(pki: TestPKI, roots: list[Path],
                                      variant: str | None) -> None:
    original = _small_pdf(variant)
    pdf = sign_with(pki, original, "p12")
    assert verify_signature(pdf, trust_roots=roots).ok
    root: Any = PdfReader(BytesIO(pdf)).trailer["/Root"]
    version = root.get("/Version")
    if variant == "pdf/a-4u":  # PDF 2.0 from the start, in the header
        assert original.startswith(b"%PDF-2.0") and version in (None, "/2.0")
    else:  # PDF 1.7 stays 1.7 with an ECDSA key
        assert original.startswith(b"%PDF-1.7") and version is None
    if variant == "pdf/a-3u":
        problems = pdfa3_problems(original, pdf)
        assert [p for p in problems if not p.startswith("6.6.4-2/3")] == []  # U, not B


def test_der_key_and_certificate(pki: TestPKI, report_pdf: bytes, roots: list[Path],
                                 tmp_path: Path) -> None:
    key = tmp_path / "signer.der"
    key.write_bytes(pki.signer.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE)))
    cert = tmp_path / "signer.cer"
    cert.write_bytes(pki.signer.cert.public_bytes(serialization.Encoding.DER))
    chain = tmp_path / "chain.pem"  # a bundle: intermediate and root, as CAs hand them out
    chain.write_bytes(pki.intermediate.cert_path.read_bytes() + pki.root.cert_path.read_bytes())
    pdf = sign_pdf(report_pdf, key_path=key, cert_path=cert, passphrase=PASSPHRASE,
                   chain_paths=[chain])
    assert verify_signature(pdf, trust_roots=roots).ok
    with pytest.raises(SigningError, match="wrong passphrase"):
        sign_pdf(report_pdf, key_path=key, cert_path=cert, passphrase=WRONG_PASSPHRASE)


def test_callable_from_a_running_event_loop(pki: TestPKI, report_pdf: bytes,
                                            roots: list[Path]) -> None:
    # e.g. straight from a Starlette handler: asyncio.run cannot nest, signing.py copes
    async def handler() -> bool:
        pdf = sign_with(pki, report_pdf, "pem")
        return verify_signature(pdf, trust_roots=roots).ok

    assert asyncio.run(handler())


def test_pdfa1_is_refused(pki: TestPKI) -> None:
    with pytest.raises(SigningError, match="PDF/A-1"):
        sign_with(pki, _small_pdf("pdf/a-1b"), "pem")


def test_already_signed_is_refused(pki: TestPKI,
                                   signed_set: dict[tuple[str, bool], bytes]) -> None:
    with pytest.raises(SigningError, match="already signed"):
        sign_with(pki, signed_set[("pem", False)], "pem")


def test_unencrypted_key_with_a_passphrase_still_signs(pki: TestPKI, report_pdf: bytes,
                                                       roots: list[Path]) -> None:
    pdf = sign_pdf(report_pdf, key_path=pki.signer_plain_key, cert_path=pki.signer.cert_path,
                   passphrase=PASSPHRASE, chain_paths=[pki.intermediate.cert_path])
    assert verify_signature(pdf, trust_roots=roots).ok
    pdf = sign_pdf(report_pdf, key_path=pki.signer_plain_key, cert_path=pki.signer.cert_path,
                   passphrase=None, chain_paths=[pki.intermediate.cert_path])
    assert verify_signature(pdf, trust_roots=roots).ok


# --- poppler's pdfsig ---------------------------------------------------------------------


@needs_pdfsig
def test_pdfsig_says_valid(signed: tuple[str, bool, bytes], tmp_path: Path) -> None:
    kind, _with_tsa, pdf = signed
    path = tmp_path / "signed.pdf"
    path.write_bytes(pdf)
    out = pdfsig(path, "-nocert")
    assert "Signature #1:" in out
    assert "- Signature Validation: Signature is Valid." in out
    assert "- Total document signed" in out
    assert "- Signature Type: ETSI.CAdES.detached" in out
    assert f"- Signer Certificate Common Name: {SIGNER_CN if kind == 'pem' else SIGNER_EC_CN}" \
        in out
    assert "Certificate Validation" not in out  # -nocert skips it
    # Without -nocert pdfsig also judges the certificate, against its NSS database, which
    # does not hold our test root: the line is there and does not say "trusted".
    full = pdfsig(path)
    assert "- Signature Validation: Signature is Valid." in full
    line = re.search(r"- Certificate Validation: (.*)", full)
    assert line is not None and line.group(1) != "Certificate is Trusted."


@needs_pdfsig
def test_pdfsig_sees_tampering(signed_set: dict[tuple[str, bool], bytes],
                               tmp_path: Path) -> None:
    path = tmp_path / "tampered.pdf"
    path.write_bytes(_edit(signed_set[("pem", True)], b"/Reason (felixscan", b"/Reason (FELIXSCAN"))
    out = pdfsig(path, "-nocert")
    assert "- Signature Validation: Digest Mismatch." in out


@needs_pdfsig
def test_pdfsig_sees_a_later_update(signed_set: dict[tuple[str, bool], bytes],
                                    tmp_path: Path) -> None:
    path = tmp_path / "updated.pdf"
    path.write_bytes(_add_annotation(signed_set[("pem", False)]))
    out = pdfsig(path, "-nocert")
    assert "- Signature Validation: Signature is Valid." in out  # the signed revision is intact
    assert "- Not total document signed" in out


# --- tampering and later changes ----------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), [
    (b"%PDF-1.7\n%", b"%PDF-1.7\n!"),  # the header's comment line: a byte nothing parses
    (b"/Location (ci\\056example", b"/Location (CI\\056example"),  # pyHanko escapes dots
    (b"/Reason (felixscan", b"/Reason (FELIXSCAN"),  # the signature dictionary itself
], ids=["header-byte", "location", "reason"])
def test_edited_byte_fails(signed_set: dict[tuple[str, bool], bytes], roots: list[Path],
                           old: bytes, new: bytes) -> None:
    pdf = _edit(signed_set[("pem", True)], old, new)
    report = verify_signature(pdf, trust_roots=roots)
    assert not report.ok
    assert report.integrity.status is Status.FAIL
    assert "changed after signing" in report.integrity.reason
    assert report.coverage.status is Status.PASS  # same length: still the whole file


def test_edited_signature_value_fails(signed_set: dict[tuple[str, bool], bytes],
                                      roots: list[Path]) -> None:
    pdf = signed_set[("pem", False)]
    start = pdf.index(b"/Contents <") + len(b"/Contents <")
    # flip a hex digit in the CMS: some of it is the signature value, some DER structure
    for offset in (400, 1200):
        at = start + offset
        digit = b"0" if pdf[at:at + 1] != b"0" else b"1"
        report = verify_signature(pdf[:at] + digit + pdf[at + 1:], trust_roots=roots)
        assert not report.ok
        assert failed(report), report.lines()


@pytest.mark.parametrize("how", ["pypdf-clone", "pypdf-new"])
def test_page_removed_fails(signed_set: dict[tuple[str, bool], bytes], roots: list[Path],
                            how: str) -> None:
    source = PdfReader(BytesIO(signed_set[("pem", True)]))
    pages = len(source.pages)
    assert pages > 2
    if how == "pypdf-clone":  # keeps the AcroForm and the signature dictionary
        writer = PdfWriter(clone_from=source)
        writer.remove_page(1)
    else:
        writer = PdfWriter()
        writer.add_page(source.pages[0])
    out = BytesIO()
    writer.write(out)
    report = verify_signature(out.getvalue(), trust_roots=roots)
    assert not report.ok
    assert failed(report), report.lines()
    if how == "pypdf-new":  # the page brought its widget, and the signature with it
        assert report.signature.status is Status.FAIL
        assert report.signature.reason == ("the file holds a signature dictionary that no "
                                           "signature field uses: the signature was taken out "
                                           "of the form")


def test_incremental_annotation_is_reported(signed_set: dict[tuple[str, bool], bytes],
                                            roots: list[Path]) -> None:
    pdf = _add_annotation(signed_set[("pem", True)])
    report = verify_signature(pdf, trust_roots=roots)
    assert not report.ok
    assert report.integrity.status is Status.PASS  # the signed revision itself is intact
    assert report.coverage.status is Status.FAIL
    assert "1 incremental update(s)" in report.coverage.reason
    assert "appended after signing" in report.coverage.reason
    # pyHanko's diff analysis calls it "OTHER" rather than "ANNOTATIONS" here: the page it
    # rewrites is also the target of the outline's links, which its rules do not explain.
    assert re.search(r"appended after signing: they (add or change annotations|change the "
                     r"document's content or structure)$", report.coverage.reason)


def test_pypdf_incremental_update_is_reported(signed_set: dict[tuple[str, bool], bytes],
                                              roots: list[Path]) -> None:
    pdf = signed_set[("p12", False)]
    writer = PdfWriter(BytesIO(pdf), incremental=True)
    writer.add_metadata({"/Title": "Not the report you signed"})
    out = BytesIO()
    writer.write(out)
    updated = out.getvalue()
    assert updated.startswith(pdf)
    report = verify_signature(updated, trust_roots=roots)
    assert not report.ok
    assert report.coverage.status is Status.FAIL
    assert "appended after signing" in report.coverage.reason


def test_certification_blocks_further_signatures(signed_set: dict[tuple[str, bool], bytes],
                                                  pki: TestPKI) -> None:
    # The DocMDP "no changes" certification at work: a conforming signer (here pyHanko
    # itself) refuses to add a second signature to the report.
    with pytest.raises(PyHankoSigningError, match="forbids all changes"):
        _plain_pyhanko_sign(pki, signed_set[("pem", False)])


def test_appended_bytes_are_reported(signed_set: dict[tuple[str, bool], bytes],
                                     roots: list[Path]) -> None:
    report = verify_signature(signed_set[("pem", False)] + b"% trailing junk\n",
                              trust_roots=roots)
    assert not report.ok
    assert report.coverage.status is Status.FAIL


# --- trust and time -----------------------------------------------------------------------


def test_wrong_root_fails(signed_set: dict[tuple[str, bool], bytes], pki: TestPKI) -> None:
    report = verify_signature(signed_set[("pem", True)],
                              trust_roots=[pki.other_root.cert_path])
    assert not report.ok
    assert report.integrity.status is Status.PASS
    assert report.trust.status is Status.FAIL
    assert report.trust.reason.endswith("does not chain to any of the trust roots given "
                                        "(CN=some other root CA,O=felixscan tests)")
    assert report.timestamp.status is Status.FAIL  # the TSA does not chain to it either


def test_tsa_root_missing_fails_the_timestamp_only(signed_set: dict[tuple[str, bool], bytes],
                                                   pki: TestPKI) -> None:
    report = verify_signature(signed_set[("p12", True)], trust_roots=[pki.root.cert_path])
    assert report.trust.status is Status.PASS
    assert report.timestamp.status is Status.FAIL
    assert "is not trusted" in report.timestamp.reason
    assert not report.ok


def test_no_trust_roots_leaves_trust_unchecked(signed_set: dict[tuple[str, bool], bytes]) -> None:
    report = verify_signature(signed_set[("pem", False)], trust_roots=None)
    assert report.trust.status is Status.NOT_CHECKED
    assert report.integrity.status is Status.PASS
    assert report.coverage.status is Status.PASS
    assert not report.ok


def test_expired_certificate_is_refused_for_signing(pki: TestPKI, report_pdf: bytes) -> None:
    assert pki.expired.key_path is not None
    with pytest.raises(SigningError, match=r"expired on \d{4}-\d\d-\d\d"):
        sign_pdf(report_pdf, key_path=pki.expired.key_path, cert_path=pki.expired.cert_path,
                 passphrase=PASSPHRASE)


def test_expired_signer_certificate_fails(pki: TestPKI, report_pdf: bytes,
                                          roots: list[Path]) -> None:
    # sign_pdf refuses, so sign with pyHanko directly, as another tool might have
    pdf = _plain_pyhanko_sign(pki, report_pdf, expired=True)
    report = verify_signature(pdf, trust_roots=roots)
    assert not report.ok
    assert report.integrity.status is Status.PASS
    assert report.validity.status is Status.FAIL
    expiry = pki.expired.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert report.validity.reason.startswith(f"the signer certificate expired on {expiry}")
    # the chain itself is fine and is reported as such
    assert report.trust.status is Status.PASS
    assert "see certificate validity" in report.trust.reason


def test_timestamp_proves_signing_before_expiry(signed_set: dict[tuple[str, bool], bytes],
                                                pki: TestPKI, roots: list[Path]) -> None:
    later = pki.signer_not_after + timedelta(days=30)  # the CAs and the TSA are still valid
    bt = verify_signature(signed_set[("pem", True)], trust_roots=roots, now=later)
    assert bt.ok, bt.lines()
    assert "timestamped signing time" in bt.validity.reason
    bb = verify_signature(signed_set[("pem", False)], trust_roots=roots, now=later)
    assert not bb.ok
    assert bb.validity.status is Status.FAIL
    assert "no trusted timestamp proves when it signed" in bb.validity.reason


def test_require_timestamp(signed_set: dict[tuple[str, bool], bytes], roots: list[Path]) -> None:
    bb = verify_signature(signed_set[("pem", False)], trust_roots=roots, require_timestamp=True)
    assert bb.timestamp.status is Status.FAIL and not bb.ok
    bt = verify_signature(signed_set[("pem", True)], trust_roots=roots, require_timestamp=True)
    assert bt.ok


# --- not signed, not a PDF ----------------------------------------------------------------


def test_unsigned_pdf(report_pdf: bytes, roots: list[Path]) -> None:
    report = verify_signature(report_pdf, trust_roots=roots)
    assert not report.ok
    assert report.signature.status is Status.FAIL
    assert {c.status for label, c in report.checks() if label != "signature"} == \
        {Status.NOT_CHECKED}


def test_not_a_pdf(roots: list[Path]) -> None:
    report = verify_signature(b"hello", trust_roots=roots)
    assert report.signature.reason == "not a PDF file (no %PDF- header)"
    with pytest.raises(SigningError, match="not a PDF"):
        sign_pdf(b"hello", key_path="x", cert_path="y", passphrase=None)


def test_unreadable_trust_root(signed_set: dict[tuple[str, bool], bytes], tmp_path: Path) -> None:
    with pytest.raises(SigningError, match="cannot read the trust root file"):
        verify_signature(signed_set[("pem", False)], trust_roots=[tmp_path / "missing.pem"])


# --- key material errors ------------------------------------------------------------------


def _assert_no_secret(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    for secret in (PASSPHRASE, WRONG_PASSPHRASE):
        assert secret.decode() not in text
        assert secret.hex() not in text
    assert "PRIVATE KEY" not in text


@pytest.mark.parametrize("kind", ["pem", "p12"])
def test_wrong_passphrase(pki: TestPKI, report_pdf: bytes, kind: str) -> None:
    assert pki.signer.key_path is not None
    key, cert = ((pki.signer.key_path, pki.signer.cert_path) if kind == "pem"
                 else (pki.signer_p12, None))
    with pytest.raises(SigningError, match="wrong passphrase") as info:
        sign_pdf(report_pdf, key_path=key, cert_path=cert, passphrase=WRONG_PASSPHRASE)
    assert str(key) in str(info.value)
    _assert_no_secret(info.value)


@pytest.mark.parametrize("kind", ["pem", "p12"])
def test_missing_passphrase(pki: TestPKI, report_pdf: bytes, kind: str) -> None:
    assert pki.signer.key_path is not None
    key, cert = ((pki.signer.key_path, pki.signer.cert_path) if kind == "pem"
                 else (pki.signer_p12, None))
    with pytest.raises(SigningError, match="needs a passphrase") as info:
        sign_pdf(report_pdf, key_path=key, cert_path=cert, passphrase=None)
    _assert_no_secret(info.value)


def test_key_and_certificate_mismatch(pki: TestPKI, report_pdf: bytes) -> None:
    assert pki.signer.key_path is not None
    with pytest.raises(SigningError, match="does not match the certificate") as info:
        sign_pdf(report_pdf, key_path=pki.signer.key_path,
                 cert_path=pki.other_signer.cert_path, passphrase=PASSPHRASE)
    assert "felixscan other signer" in str(info.value)
    _assert_no_secret(info.value)


def test_unreadable_files(pki: TestPKI, report_pdf: bytes, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(SigningError, match=r"cannot read the private key file .*nope\.key: "
                                           r"No such file"):
        sign_pdf(report_pdf, key_path=missing, cert_path=pki.signer.cert_path, passphrase=None)
    with pytest.raises(SigningError, match=r"cannot read the PKCS#12 file"):
        sign_pdf(report_pdf, key_path=missing, cert_path=None, passphrase=PASSPHRASE)
    assert pki.signer.key_path is not None
    with pytest.raises(SigningError, match=r"cannot read the certificate chain file"):
        sign_pdf(report_pdf, key_path=pki.signer.key_path, cert_path=pki.signer.cert_path,
                 passphrase=PASSPHRASE, chain_paths=[tmp_path / "chain.pem"])


def test_files_of_the_wrong_kind(pki: TestPKI, report_pdf: bytes, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not key material\n")
    with pytest.raises(SigningError, match="holds no readable private key"):
        sign_pdf(report_pdf, key_path=junk, cert_path=pki.signer.cert_path, passphrase=None)
    with pytest.raises(SigningError, match="is not a PKCS#12"):
        sign_pdf(report_pdf, key_path=junk, cert_path=None, passphrase=PASSPHRASE)
    assert pki.signer.key_path is not None
    with pytest.raises(SigningError, match=r"holds no readable X\.509 certificate"):
        sign_pdf(report_pdf, key_path=pki.signer.key_path, cert_path=junk,
                 passphrase=PASSPHRASE)
    # a certificate where the key should be
    with pytest.raises(SigningError, match="holds no readable private key"):
        sign_pdf(report_pdf, key_path=pki.signer.cert_path, cert_path=pki.signer.cert_path,
                 passphrase=None)


def test_pkcs12_with_a_certificate_file(pki: TestPKI, report_pdf: bytes) -> None:
    with pytest.raises(SigningError, match="is a PKCS#12 file, which holds its own "
                                           "certificate: give it alone"):
        sign_pdf(report_pdf, key_path=pki.signer_p12, cert_path=pki.signer_ec.cert_path,
                 passphrase=PASSPHRASE)


# --- TSA failures -------------------------------------------------------------------------


def test_tsa_unreachable(pki: TestPKI, report_pdf: bytes) -> None:
    url = closed_port_url()
    with pytest.raises(SigningError, match="is unreachable") as info:
        sign_with(pki, report_pdf, "pem", url)
    assert url in str(info.value)
    _assert_no_secret(info.value)


def test_tsa_timeout(pki: TestPKI, report_pdf: bytes) -> None:
    assert pki.signer.key_path is not None
    with silent_server() as url, pytest.raises(SigningError,
                                               match=r"did not answer within 0\.5 s"):
        sign_pdf(report_pdf, key_path=pki.signer.key_path, cert_path=pki.signer.cert_path,
                 passphrase=PASSPHRASE, tsa_url=url, tsa_timeout=0.5)


@pytest.mark.parametrize(("status", "content_type", "expected"), [
    (503, "text/plain", "answered HTTP 503"),
    (200, "text/html", "did not answer with an RFC 3161 timestamp reply"),
], ids=["http-503", "web-page"])
def test_tsa_wrong_answers(pki: TestPKI, report_pdf: bytes, status: int, content_type: str,
                           expected: str) -> None:
    with fixed_answer_server(status, content_type) as url, \
            pytest.raises(SigningError, match=expected):
        sign_with(pki, report_pdf, "pem", url)


def test_tsa_url_must_be_http(pki: TestPKI, report_pdf: bytes) -> None:
    with pytest.raises(SigningError, match="not an http:// or https:// URL"):
        sign_with(pki, report_pdf, "pem", "ftp://127.0.0.1/tsa")


def test_tsa_credentials_are_redacted(pki: TestPKI, report_pdf: bytes) -> None:
    url = closed_port_url().replace("http://", "http://user:hunter2@")
    with pytest.raises(SigningError, match=r"http://user:\*\*\*@127\.0\.0\.1:\d+/tsa is "
                                           "unreachable") as info:
        sign_with(pki, report_pdf, "pem", url)
    assert "hunter2" not in "".join(traceback.format_exception(info.value))


# --- helpers ------------------------------------------------------------------------------


def _edit(pdf: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and pdf.count(old) == 1, old
    return pdf.replace(old, new)


def _add_annotation(pdf: bytes) -> bytes:
    """An incremental update adding a text note to page 1, as a viewer would."""
    writer = IncrementalPdfFileWriter(BytesIO(pdf))
    page_ref = writer.root["/Pages"]["/Kids"][0]
    page = page_ref.get_object()
    annot = writer.add_object(generic.DictionaryObject({
        generic.pdf_name("/Type"): generic.pdf_name("/Annot"),
        generic.pdf_name("/Subtype"): generic.pdf_name("/Text"),
        generic.pdf_name("/Rect"): generic.ArrayObject(
            [generic.NumberObject(v) for v in (50, 50, 70, 70)]),
        generic.pdf_name("/Contents"): generic.TextStringObject("looks fine to me"),
        generic.pdf_name("/F"): generic.NumberObject(4),
    }))
    annots = page.get("/Annots", generic.ArrayObject())
    annots.append(annot)
    page[generic.pdf_name("/Annots")] = annots
    writer.update_container(page)
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def _plain_pyhanko_sign(pki: TestPKI, pdf: bytes, *, expired: bool = False) -> bytes:
    """Sign with pyHanko's defaults, bypassing signing.py's checks."""
    issued = pki.expired if expired else pki.signer_ec
    key = issued.key_path
    if key is None:  # the ECDSA signer has only its PKCS#12 file
        signer = SimpleSigner.load_pkcs12(str(pki.signer_p12), passphrase=PASSPHRASE)
    else:
        signer = SimpleSigner(
            signing_cert=next(iter(load_certs_from_pemder([str(issued.cert_path)]))),
            signing_key=load_private_key_from_pemder(str(key), passphrase=PASSPHRASE),
            cert_registry=SimpleCertificateStore.from_certs(
                list(load_certs_from_pemder([str(pki.intermediate.cert_path)]))))
    assert signer is not None
    meta = PdfSignatureMetadata(field_name="Signature1", subfilter=SigSeedSubFilter.PADES,
                                md_algorithm="sha256")
    out = PdfSigner(meta, signer=signer).sign_pdf(IncrementalPdfFileWriter(BytesIO(pdf)))
    signed: bytes = out.getvalue()
    return signed


# --- PDF/A-3b: the rules of veraPDF's profile that a signature's update can break -----------
# veraPDF itself is a Java program and cannot be installed here; messages start with its rule
# id (clause-test) where there is one. Everything before the update is WeasyPrint's output,
# byte for byte, and the last check makes sure the update rewrites no object but the catalog,
# the Info dictionary, the XMP metadata and the page that gets the signature widget.

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
PDF_NS = "http://ns.adobe.com/pdf/1.3/"
XMP_NS = "http://ns.adobe.com/xap/1.0/"
PDFAID = "http://www.aiim.org/pdfa/ns/id/"
# Properties a signer may add or update: both are in schemas predefined by XMP (6.6.2.3.1).
UPDATABLE = {(XMP_NS, "ModifyDate"), (XMP_NS, "MetadataDate"), (PDF_NS, "Producer")}
ALLOWED_FILTERS = {b"ASCIIHexDecode", b"ASCII85Decode", b"FlateDecode", b"RunLengthDecode",
                   b"CCITTFaxDecode", b"JBIG2Decode", b"DCTDecode", b"JPXDecode"}


def pdfa3_problems(original: bytes, signed: bytes) -> list[str]:
    """Every rule the signed file breaks, as readable lines; [] when it keeps them all."""
    problems: list[str] = []

    def need(ok: object, rule: str, text: str) -> None:
        if not ok:
            problems.append(f"{rule}: {text}")

    need(signed.startswith(original), "incremental", "the original bytes were changed")
    increment = signed[len(original):]
    need(re.match(rb"%PDF-1\.[0-7](\r\n|\r|\n)%[\x80-\xff]{4}", signed), "6.1.2-1/2",
         "header is not %PDF-1.n with a binary comment line")
    eof = signed.rfind(b"%%EOF")
    need(eof >= 0 and signed[eof + 5:] in (b"", b"\n", b"\r", b"\r\n"), "6.1.3-3",
         "data after the last %%EOF")
    _syntax(increment, need)

    orig = PdfFileReader(BytesIO(original))
    r = PdfFileReader(BytesIO(signed))
    root = r.root
    version = _get(root, "/Version")
    need(version is None or str(version).lstrip("/") <= "1.7", "version",
         f"catalog /Version {version}: PDF/A-3 is a PDF 1.7 profile")
    trailer = r.trailer_view
    need("/ID" in trailer, "6.1.3-1", "no /ID in the trailer")
    need("/Encrypt" not in trailer, "6.1.3-2", "/Encrypt in the trailer")

    _metadata(orig, r, need)
    _annotations(r, need)
    acroform = _get(root, "/AcroForm")
    if acroform is not None:
        need(not _get(acroform, "/NeedAppearances", False), "6.4.1-3", "NeedAppearances true")
        need("/XFA" not in acroform, "6.4.2-1", "XFA in the AcroForm")
    need("/NeedsRendering" not in root, "6.4.2-2", "NeedsRendering in the catalog")
    perms = _get(root, "/Perms")
    if perms is not None:
        need(set(perms.keys()) <= {"/DocMDP", "/UR3"}, "6.1.12-1",
             f"permissions {sorted(perms.keys())}")
    _signatures(r, len(signed), need)
    _rewritten(orig, r, need)
    return problems


def _get(d: Any, key: str, default: Any = None) -> Any:
    """d[key], dereferenced (pyHanko's dict.get returns indirect references as they are)."""
    return d[key] if key in d else default  # noqa: SIM401 - .get() would not dereference


def _syntax(increment: bytes, need: Any) -> None:
    for m in re.finditer(rb"(\d+)(\s+)(\d+)(\s+)obj\b", increment):
        need(m.group(2) == b" " and m.group(4) == b" ", "6.1.9-1",
             f"object header {m.group(0)!r}")
    for m in re.finditer(rb">>\s*stream(\r\n|\n|\r)?", increment):
        need(m.group(1) in (b"\r\n", b"\n"), "6.1.7.1-2", "stream keyword without CRLF/LF")
        header = increment[increment.rfind(b" obj", 0, m.start()):m.start()]
        length = re.search(rb"/Length (\d+)(?! \d+ R)", header)
        need(length, "6.1.7.1-1", "stream Length not a direct number")
        if length:
            end = m.end() + int(length.group(1))
            need(re.match(rb"(\r\n|\n|\r)endstream", increment[end:end + 12]), "6.1.7.1-1/2",
                 "stream Length does not end at EOL + endstream")
        for key in (b"/F ", b"/FFilter", b"/FDecodeParms"):
            need(key not in header, "6.1.7.1-3", f"stream dictionary with {key.decode()}")
        found = re.search(rb"/Filter\s*(\[[^\]]*\]|/\w+)", header)
        for name in re.findall(rb"/(\w+)", found.group(1) if found else b""):
            need(name in ALLOWED_FILTERS, "6.1.7.2-1", f"filter {name.decode()}")


def _xmp_properties(data: bytes) -> dict[tuple[str, str], str]:
    props: dict[tuple[str, str], str] = {}
    for desc in ET.fromstring(data).iter(f"{{{RDF}}}Description"):
        for attr, value in desc.attrib.items():
            if attr.startswith("{") and not attr.startswith(f"{{{RDF}}}"):
                ns, local = attr[1:].split("}")
                props[(ns, local)] = value
        for child in desc:
            ns, local = child.tag[1:].split("}")
            props[(ns, local)] = " ".join(t.strip() for t in child.itertext() if t.strip())
    return props


def _metadata(orig: PdfFileReader, r: PdfFileReader, need: Any) -> None:
    meta = _get(r.root, "/Metadata")
    need(meta is not None, "6.6.2.1-1", "no /Metadata in the catalog")
    if meta is None:
        return
    meta = meta.get_object()
    need(_get(meta, "/Type") == "/Metadata" and _get(meta, "/Subtype") == "/XML", "6.6.2.1-1",
         "metadata stream without /Type /Metadata /Subtype /XML")
    data = meta.data
    header = re.match(rb"\s*<\?xpacket[^?]*\?>", data)
    need(header and b"bytes=" not in header.group(0), "6.6.2.1-2", "xpacket bytes attribute")
    need(header and b"encoding=" not in header.group(0), "6.6.2.1-3",
         "xpacket encoding attribute")
    try:
        data.decode("utf-8")
        new = _xmp_properties(data)
    except (UnicodeDecodeError, ET.ParseError) as exc:
        need(False, "6.6.2.1-4/5", f"XMP not well-formed UTF-8 XML: {exc}")
        return
    old = _xmp_properties(orig.root["/Metadata"].get_object().data)
    need(new.get((PDFAID, "part")) == "3" and new.get((PDFAID, "conformance")) == "B",
         "6.6.4-2/3", f"pdfaid part/conformance now {new.get((PDFAID, 'part'))}/"
         f"{new.get((PDFAID, 'conformance'))}")
    added = set(new) - set(old) - UPDATABLE
    need(not added, "6.6.2.3.1-1", f"properties added outside predefined schemas: {added}")
    for key, value in old.items():
        if key not in UPDATABLE:
            need(new.get(key) == value, "metadata", f"{key} changed: {value!r} -> "
                 f"{new.get(key)!r}")


def _page_dicts(node: Any, ref: Any = None) -> list[tuple[Any, Any]]:
    """(reference, page dictionary) for every page under `node` (a reference or dict)."""
    if isinstance(node, generic.IndirectObject):
        ref, node = node, node.get_object()
    if _get(node, "/Type") == "/Pages":
        return [p for kid in node.raw_get("/Kids") for p in _page_dicts(kid)]
    return [(ref, node)]


def _annotations(r: PdfFileReader, need: Any) -> None:
    for _, page in _page_dicts(r.root.raw_get("/Pages")):
        for annot_ref in _get(page, "/Annots", []):
            annot = annot_ref.get_object()
            flags = int(_get(annot, "/F", 0))
            need("/F" in annot or _get(annot, "/Subtype") == "/Popup", "6.3.2-1", "no /F")
            need(flags & 4 and not flags & (1 | 2 | 32 | 256), "6.3.2-2",
                 f"annotation flags {flags}: print must be set, hidden/invisible/noview not")
            x1, y1, x2, y2 = (float(v) for v in annot["/Rect"])
            # veraPDF's test: (width == 0 && height == 0) || Subtype == "Popup" ||
            # Subtype == "Link" || AP != null (WeasyPrint's links have no appearance)
            need((x1 == x2 and y1 == y2) or "/AP" in annot
                 or _get(annot, "/Subtype") in ("/Popup", "/Link"), "6.3.3-1",
                 "annotation with a size and no appearance")
            if "/AP" in annot:
                need(set(annot["/AP"].keys()) == {"/N"}, "6.3.3-2", "/AP with more than /N")
            if _get(annot, "/Subtype") == "/Widget":
                need("/A" not in annot and "/AA" not in annot, "6.4.1-1", "widget A/AA")


def _signatures(r: PdfFileReader, size: int, need: Any) -> None:
    for emb in r.embedded_signatures:
        _, len1, start2, len2 = (int(x) for x in emb.byte_range)
        contents = 2 * len(emb.pkcs7_content) + 2
        need(start2 + len2 == size and start2 == len1 + contents, "6.4.3-1",
             "ByteRange does not cover the whole file but /Contents")
        signed_data = cms.ContentInfo.load(emb.pkcs7_content)["content"]
        need(len(signed_data["signer_infos"]) == 1, "6.4.3-3", "not exactly one SignerInfo")
        need(emb.signer_cert is not None, "6.4.3-2", "signer certificate not embedded")
        reference = _get(emb.sig_object, "/Reference")
        for item in reference or []:
            ref = item.get_object()
            need(not {"/DigestLocation", "/DigestMethod", "/DigestValue"} & set(ref.keys()),
                 "6.1.12-2", "DocMDP reference with Digest* keys")


def _rewritten(orig: PdfFileReader, r: PdfFileReader, need: Any) -> None:
    size = int(orig.trailer_view["/Size"])
    last = r.xrefs.total_revisions - 1
    rewritten = {ref.idnum for ref in r.xrefs.explicit_refs_in_revision(last) if ref.idnum < size}
    allowed = {orig.root_ref.idnum}
    info = orig.trailer_view.raw_get("/Info") if "/Info" in orig.trailer_view else None
    if isinstance(info, generic.IndirectObject):
        allowed.add(info.idnum)
    meta = orig.root.raw_get("/Metadata")
    if isinstance(meta, generic.IndirectObject):
        allowed.add(meta.idnum)
    pages = orig.root.raw_get("/Pages")
    allowed |= {ref.idnum for ref, _ in _page_dicts(pages) if ref is not None}
    need(rewritten <= allowed, "untouched", f"objects rewritten beyond catalog, Info, XMP and "
         f"pages: {sorted(rewritten - allowed)}")


# --- verify_report: every check `report verify` makes ----------------------------------------


def checks_of(result: ReportVerification) -> dict[str, tuple[Outcome, str]]:
    assert [c.name for c in result.checks] == CHECKS  # the same lines, whatever the file
    return {c.name: (c.outcome, c.reason) for c in result.checks}


def put(tmp_path: Path, pdf: bytes, name: str = "report.pdf") -> Path:
    path = tmp_path / name
    path.write_bytes(pdf)
    return path


def _without_page(pdf: bytes, index: int) -> bytes:
    """The file with one page taken out by pypdf, everything else (the embedded data, the
    AcroForm, the signature dictionary) kept."""
    writer = PdfWriter(clone_from=PdfReader(BytesIO(pdf)))
    writer.remove_page(index)
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def _with_text_edited(pdf: bytes, index: int) -> bytes:
    """One glyph of the first text run on page `index + 1` replaced by another glyph of the
    same run ("Executive summary" -> "xxecutive summary"), as an editor of the decompressed
    content stream would; the embedded data and its hash stay as they were."""
    writer = PdfWriter(clone_from=PdfReader(BytesIO(pdf)))
    page = writer.pages[index]
    data = page.get_contents().get_data()
    for run in re.finditer(rb"\[(<[0-9a-f]+>[^\]]*)\] ?TJ", data):
        codes = re.findall(rb"<([0-9a-f]+)>", run.group(0))
        if len(set(codes)) >= 2:
            first, other = codes[0], next(c for c in codes if c != codes[0])
            edited = run.group(0).replace(b"<" + first + b">", b"<" + other + b">", 1)
            data = data[:run.start()] + edited + data[run.end():]
            break
    else:
        raise AssertionError("no text run to edit")
    stream = DecodedStreamObject()
    stream.set_data(data)
    page.replace_contents(stream)
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def test_verify_signed_and_timestamped_report(signed_set: dict[tuple[str, bool], bytes],
                                              roots: list[Path], tmp_path: Path) -> None:
    result = verify_report(put(tmp_path, signed_set[("pem", True)]), trust_roots=roots)
    checks = checks_of(result)
    assert result.ok and result.signed
    assert [n for n, (o, _) in checks.items() if o is not Outcome.OK] == ["pages"]
    assert checks["pages"] == (Outcome.NOT_CHECKED,
                               "the signature covers the whole file, every page included")
    assert checks["trust"][1].startswith("chains to the trust root CN=felixscan test root CA")
    assert checks["timestamp"][1].endswith(f"from the TSA CN={TSA_CN},O=felixscan tests")
    assert f"signer: CN={SIGNER_CN},O=felixscan tests" in result.details


def test_verify_unsigned_report_renders_every_page_again(report_pdf: bytes, roots: list[Path],
                                                        tmp_path: Path) -> None:
    path = put(tmp_path, report_pdf)
    result = verify_report(path)
    checks = checks_of(result)
    assert result.ok and not result.signed
    pages = len(PdfReader(path).pages)
    assert checks["pages"] == (Outcome.OK, f"the text of all {pages} pages matches a fresh "
                               "rendering of the embedded data")
    assert checks["embedded data"][0] is Outcome.OK
    assert checks["signature"] == (Outcome.NOT_CHECKED,
                                   "the report is not signed: nothing shows who made it")
    assert {checks[n] for n in CHECKS[2:7]} == {(Outcome.NOT_CHECKED, "the report is not signed")}
    # Trust roots say a signature is expected: an unsigned report then fails.
    expecting = checks_of(verify_report(path, trust_roots=roots))
    assert expecting["signature"] == (Outcome.FAILED, "the report is not signed, but trust roots "
                                      "were given: a signed report was expected")


def test_unsigned_report_with_a_page_removed_fails(report_pdf: bytes, tmp_path: Path) -> None:
    pages = len(PdfReader(BytesIO(report_pdf)).pages)
    result = verify_report(put(tmp_path, _without_page(report_pdf, 2)))
    checks = checks_of(result)
    assert not result.ok
    assert checks["embedded data"][0] is Outcome.OK  # the data and its hash are untouched
    assert checks["pages"][0] is Outcome.FAILED
    assert checks["pages"][1].startswith(f"the file has {pages - 1} pages where the embedded "
                                         f"data renders to {pages}; page 3 reads ")


def test_unsigned_report_with_edited_text_fails(report_pdf: bytes, tmp_path: Path) -> None:
    edited = _with_text_edited(report_pdf, 1)
    assert "xxecutive summary" in PdfReader(BytesIO(edited)).pages[1].extract_text()
    checks = checks_of(verify_report(put(tmp_path, edited)))
    assert checks["embedded data"][0] is Outcome.OK
    assert checks["pages"][0] is Outcome.FAILED
    assert checks["pages"][1] == ("page 2 reads 'xxecutive summary 0 compliant ' where a "
                                  "fresh rendering of the embedded data reads 'Executive "
                                  "summary 0 compliant '")


def test_signed_report_with_a_page_removed_fails(signed_set: dict[tuple[str, bool], bytes],
                                                 roots: list[Path], tmp_path: Path) -> None:
    result = verify_report(put(tmp_path, _without_page(signed_set[("pem", True)], 2)),
                           trust_roots=roots)
    checks = checks_of(result)
    assert not result.ok and result.signed
    assert checks["coverage"][0] is Outcome.FAILED or checks["integrity"][0] is Outcome.FAILED
    # The signature no longer vouches for the pages, so they are compared again, and differ.
    assert checks["pages"][0] is Outcome.FAILED


def test_signed_report_with_an_edited_byte_fails(signed_set: dict[tuple[str, bool], bytes],
                                                 roots: list[Path], tmp_path: Path) -> None:
    pdf = _edit(signed_set[("p12", True)], b"/Reason (felixscan", b"/Reason (FELIXSCAN")
    checks = checks_of(verify_report(put(tmp_path, pdf), trust_roots=roots))
    assert checks["integrity"][0] is Outcome.FAILED
    assert "changed after signing" in checks["integrity"][1]
    assert checks["coverage"][0] is Outcome.OK  # same length: still the whole file
    assert checks["pages"][0] is Outcome.OK  # what was edited is not on a page


def test_signature_taken_out_of_the_form_fails(signed_set: dict[tuple[str, bool], bytes],
                                               tmp_path: Path) -> None:
    writer = PdfWriter(clone_from=PdfReader(BytesIO(signed_set[("pem", False)])))
    del writer.root_object[NameObject("/AcroForm")]
    del writer.root_object[NameObject("/Perms")]
    out = BytesIO()
    writer.write(out)
    result = verify_report(put(tmp_path, out.getvalue()))
    assert not result.ok
    assert checks_of(result)["signature"] == (
        Outcome.FAILED, "the file holds a signature dictionary that no signature field uses: "
        "the signature was taken out of the form")


def test_not_a_felixscan_report(tmp_path: Path, roots: list[Path]) -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=595, height=842)
    plain = tmp_path / "plain.pdf"
    with plain.open("wb") as fh:
        writer.write(fh)
    with pytest.raises(ReportError, match=f"not a felixscan report: it has no {ATTACHMENT_NAME}"):
        verify_report(plain)
    with pytest.raises(ReportError, match="not a PDF file"):
        verify_report(put(tmp_path, b"hello", "x.pdf"))


# --- the CLI: felixscan report --sign-*, felixscan report verify -----------------------------


def felixscan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_line(out: str, name: str, outcome: str) -> str:
    """The reason on the line of check `name`, which must have `outcome`."""
    found = re.search(rf"^  {re.escape(name)} +{re.escape(outcome)} +(.*)$", out, re.MULTILINE)
    assert found is not None, f"no {name!r} {outcome} line in:\n{out}"
    return found.group(1)


def original_revision(signed: bytes) -> bytes:
    """What was signed: the file up to the end of its first revision."""
    end = signed.index(b"%%EOF") + len(b"%%EOF")
    return signed[:end + (1 if signed[end:end + 1] == b"\n" else 0)]


@needs_pdfsig
def test_cli_signs_and_verifies_a_report(report_db: str, pki: TestPKI, tsa: LoopbackTSA,
                                         chain_pem: Path, roots: list[Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASS_ENV, PASSPHRASE.decode())
    out = tmp_path / "q1.pdf"
    assert pki.signer.key_path is not None
    code, stdout, stderr = felixscan(
        capsys, "report", "--db", report_db, *PERIOD_FLAGS, "--out", str(out),
        "--pdf-variant", "pdf/a-3b", "--sign-key", str(pki.signer.key_path),
        "--sign-cert", str(chain_pem), "--sign-passphrase-env", PASS_ENV, "--tsa-url", tsa.url,
        "--sign-reason", "Q1 audit evidence", "--sign-location", "platform team")
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out} (pdf, ")
    assert f"  signed by CN={SIGNER_CN},O=felixscan tests (PAdES B-T, timestamped; " \
        "certificate SHA-256 " in stdout
    assert PASSPHRASE.decode() not in stdout + stderr
    signed = out.read_bytes()
    assert pdfa3_problems(original_revision(signed), signed) == []
    sig = next(f for f in (PdfReader(out).get_fields() or {}).values()
               if f.get("/T") == SIGNATURE_FIELD)["/V"]
    assert (sig["/Reason"], sig["/Location"]) == ("Q1 audit evidence", "platform team")

    report = pdfsig(out, "-nocert")
    assert "- Signature Validation: Signature is Valid." in report
    assert "- Total document signed" in report
    assert "- Signature Type: ETSI.CAdES.detached" in report
    assert f"- Signer Certificate Common Name: {SIGNER_CN}" in report

    trust = [arg for root in roots for arg in ("--trust", str(root))]
    code, stdout, stderr = felixscan(capsys, "report", "verify", str(out), *trust)
    assert code == 0, stdout + stderr
    assert stdout.startswith(f"{out}: OK: 7 check(s) passed, not checked: pages\n")
    assert check_line(stdout, "trust", "OK").startswith(
        "chains to the trust root CN=felixscan test root CA,O=felixscan tests via "
        "CN=felixscan test issuing CA")
    assert check_line(stdout, "timestamp", "OK").endswith(f"from the TSA CN={TSA_CN},O=felixscan "
                                                          "tests")
    assert check_line(stdout, "coverage", "OK").startswith("the signature covers the whole file")
    assert check_line(stdout, "pages", "not checked") == ("the signature covers the whole file, "
                                                          "every page included")
    assert re.search(r"^  recorded SHA-256   [0-9a-f]{64}$", stdout, re.MULTILINE)
    assert stderr == ""

    # Without --trust: the signature and the file check out, but nobody vouches for the signer.
    code, stdout, _ = felixscan(capsys, "report", "verify", str(out))
    assert code == 0
    assert check_line(stdout, "trust", "not checked").startswith("no trust roots were given")

    # The same report, each way it can be spoilt: exit 1 and the check that caught it.
    pages = len(PdfReader(out).pages)
    spoilt = {"page-removed.pdf": _without_page(signed, 1),
              "edited.pdf": _edit(signed, b"/Reason (Q1 audit", b"/Reason (Q2 audit"),
              "updated.pdf": _add_annotation(signed)}
    for name, pdf in spoilt.items():
        path = put(tmp_path, pdf, name)
        code, stdout, stderr = felixscan(capsys, "report", "verify", str(path), *trust)
        assert code == 1, (name, stdout)
        assert stdout.startswith(f"{path}: FAILED: "), stdout
        assert "Traceback" not in stderr
        report = pdfsig(path, "-nocert")
        if name == "page-removed.pdf":
            assert check_line(stdout, "pages", "FAILED").startswith(
                f"the file has {pages - 1} pages where the embedded data renders to {pages}")
        elif name == "edited.pdf":
            assert check_line(stdout, "integrity", "FAILED").startswith(
                "the signed bytes were changed after signing")
            assert "- Signature Validation: Digest Mismatch." in report
        else:
            assert "1 incremental update(s)" in check_line(stdout, "coverage", "FAILED")
            assert "- Not total document signed" in report


def test_cli_report_and_verify_on_each_database(db_url: str, pki: TestPKI, roots: list[Path],
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """From SQLite and from PostgreSQL (whose JSONB orders keys its own way): the pages of an
    unsigned report render again to the same text, and a signed one verifies."""
    with Store(db_url) as store:
        populate(store)
    monkeypatch.setenv(PASS_ENV, PASSPHRASE.decode())
    signed, unsigned = tmp_path / "signed.pdf", tmp_path / "unsigned.pdf"
    for out, flags in ((signed, ["--sign-key", str(pki.signer_p12), "--sign-passphrase-env",
                                 PASS_ENV]), (unsigned, [])):
        code, _, stderr = felixscan(capsys, "report", "--db", db_url, *PERIOD_FLAGS, "--out",
                                    str(out), *flags)
        assert code == 0, stderr
    code, stdout, _ = felixscan(capsys, "report", "verify", str(signed), str(unsigned))
    assert code == 0, stdout
    assert check_line(stdout, "pages", "OK").startswith("the text of all ")
    assert check_line(stdout, "integrity", "OK")
    trust = [arg for root in roots for arg in ("--trust", str(root))]
    code, stdout, _ = felixscan(capsys, "report", "verify", str(signed), str(unsigned), *trust)
    assert code == 1
    assert f"{signed}: OK: " in stdout and f"{unsigned}: FAILED: signature\n" in stdout


def test_cli_verify_unsigned_reports(report_pdf: bytes, tmp_path: Path, roots: list[Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    good = put(tmp_path, report_pdf, "good.pdf")
    removed = put(tmp_path, _without_page(report_pdf, 3), "removed.pdf")
    edited = put(tmp_path, _with_text_edited(report_pdf, 1), "edited.pdf")
    code, stdout, stderr = felixscan(capsys, "report", "verify", str(good), str(removed),
                                     str(edited))
    assert code == 1, stdout + stderr
    assert f"{good}: OK: 2 check(s) passed, not checked: signature, coverage, integrity, " \
        "trust, certificate validity, timestamp\n" in stdout
    assert f"{removed}: FAILED: pages\n" in stdout
    assert f"{edited}: FAILED: pages\n" in stdout
    assert "page 2 reads 'xxecutive summary" in stdout
    assert check_line(stdout, "signature", "not checked") == ("the report is not signed: "
                                                              "nothing shows who made it")
    code, stdout, _ = felixscan(capsys, "report", "verify", str(good), "--trust", str(roots[0]))
    assert code == 1
    assert check_line(stdout, "signature", "FAILED").startswith("the report is not signed, but "
                                                                "trust roots were given")


def test_cli_verify_wrong_root_and_expired_signer(signed_set: dict[tuple[str, bool], bytes],
                                                  pki: TestPKI, report_pdf: bytes,
                                                  roots: list[Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = put(tmp_path, signed_set[("pem", True)])
    code, stdout, stderr = felixscan(capsys, "report", "verify", str(path), "--trust",
                                     str(pki.other_root.cert_path))
    assert code == 1
    assert stdout.startswith(f"{path}: FAILED: trust, timestamp\n")
    assert check_line(stdout, "trust", "FAILED").endswith(
        "does not chain to any of the trust roots given (CN=some other root CA,O=felixscan "
        "tests)")
    assert check_line(stdout, "integrity", "OK")
    assert "Traceback" not in stderr and "WARNING" not in stderr  # pyHanko kept quiet

    expired = put(tmp_path, _plain_pyhanko_sign(pki, report_pdf, expired=True), "expired.pdf")
    trust = [arg for root in roots for arg in ("--trust", str(root))]
    code, stdout, stderr = felixscan(capsys, "report", "verify", str(expired), *trust)
    assert code == 1
    expiry = pki.expired.cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert check_line(stdout, "certificate validity", "FAILED").startswith(
        f"the signer certificate expired on {expiry}")
    assert check_line(stdout, "timestamp", "not checked") == ("the signature has no RFC 3161 "
                                                              "timestamp")
    assert "Traceback" not in stderr


def test_cli_verify_exit_2_for_what_is_no_report(report_pdf: bytes, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    good = put(tmp_path, report_pdf, "good.pdf")
    junk = put(tmp_path, b"not a pdf", "junk.pdf")
    writer = PdfWriter()
    writer.add_blank_page(width=595, height=842)
    plain = tmp_path / "plain.pdf"
    with plain.open("wb") as fh:
        writer.write(fh)
    code, stdout, stderr = felixscan(capsys, "report", "verify", str(junk), str(good),
                                     str(plain))
    assert code == 2
    assert stdout.count(": OK: ") == 1  # every file is checked, whatever came before
    assert f"felixscan: report error: {junk}: not a PDF file" in stderr
    assert f"felixscan: report error: {plain}: not a felixscan report" in stderr
    code, stdout, stderr = felixscan(capsys, "report", "verify", str(good), "--trust",
                                     str(tmp_path / "missing-ca.pem"))
    assert code == 2 and stdout == ""
    assert "cannot read the trust root file" in stderr


def test_cli_signing_errors_leave_no_file(report_db: str, pki: TestPKI, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "r.pdf"
    wrong = tmp_path / "wrong-pass"
    wrong.write_bytes(WRONG_PASSPHRASE + b"\n")
    assert pki.signer.key_path is not None and pki.expired.key_path is not None
    monkeypatch.setenv(PASS_ENV, PASSPHRASE.decode())
    cases = {
        "wrong passphrase": (["--sign-key", str(pki.signer_p12), "--sign-passphrase-file",
                              str(wrong)], f"wrong passphrase for the PKCS#12 file "
                             f"{pki.signer_p12}"),
        "no passphrase": (["--sign-key", str(pki.signer.key_path), "--sign-cert",
                           str(pki.signer.cert_path)], "is encrypted and needs a passphrase"),
        "unset variable": (["--sign-key", str(pki.signer_p12), "--sign-passphrase-env",
                            "FELIXSCAN_TEST_NOT_SET"], "the environment variable "
                           "FELIXSCAN_TEST_NOT_SET, named for the signing key's passphrase, "
                           "is not set"),
        "unreadable key": (["--sign-key", str(tmp_path / "nope.p12")], "cannot read the "
                           "PKCS#12 file"),
        "expired": (["--sign-key", str(pki.expired.key_path), "--sign-cert",
                     str(pki.expired.cert_path), "--sign-passphrase-env", PASS_ENV],
                    "expired on"),
        "TSA unreachable": (["--sign-key", str(pki.signer_p12), "--sign-passphrase-env",
                             PASS_ENV, "--tsa-url", closed_port_url()], "is unreachable"),
    }
    for name, (flags, message) in cases.items():
        code, stdout, stderr = felixscan(capsys, "report", "--db", report_db, *PERIOD_FLAGS,
                                         "--out", str(out), *flags)
        assert code == 2, (name, stderr)
        assert stderr.startswith("felixscan: report error: "), (name, stderr)
        assert message in stderr, (name, stderr)
        assert "Traceback" not in stderr
        for secret in (PASSPHRASE, WRONG_PASSPHRASE):
            assert secret.decode() not in stdout + stderr
        assert list(out_dir.iterdir()) == [], name  # nothing written, not even half


@pytest.mark.parametrize(("flags", "message"), [
    (["--sign-cert", "c.pem"], "--sign-cert needs --sign-key"),
    (["--sign-key", "k.pem", "--sign-passphrase-env", "A", "--sign-passphrase-file", "f"],
     "give --sign-passphrase-env or --sign-passphrase-file, not both"),
    (["--sign-key", "k.pem", "--sign-passphrase-env", "hunter2 is my pass"],
     "takes the NAME of an environment variable"),
    (["--tsa-url", "http://127.0.0.1:1/"], "nothing to sign with; add --sign-key"),
    (["--sign-key", "k.pem", "--out", "{tmp}/r.html"],
     "only PDF reports are signed (this is html)"),
    (["--trust", "ca.pem"], "--trust is for `report verify FILE.pdf`"),
], ids=["cert-alone", "two-passphrases", "passphrase-as-name", "tsa-alone", "html", "trust"])
def test_cli_signing_usage_errors(report_db: str, tmp_path: Path, flags: list[str],
                                  message: str, capsys: pytest.CaptureFixture[str]) -> None:
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    out = ["--out", str(tmp_path / "r.pdf")] if "--out" not in flags else []
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--db", report_db, *out, *flags])
    assert exit_.value.code == 2
    _, stderr = capsys.readouterr()
    assert message in stderr
    assert "hunter2" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_verify_refuses_signing_flags(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", "verify", str(tmp_path / "r.pdf"), "--sign-key", "k.pem"])
    assert exit_.value.code == 2
    assert "--sign-key: for signing a report, not for `report verify`" in \
        capsys.readouterr().err


def test_cli_verify_in_a_fresh_process(signed_set: dict[tuple[str, bool], bytes],
                                       roots: list[Path], tmp_path: Path) -> None:
    """`python -m scanner report verify` as an auditor runs it: no log noise from pyHanko."""
    path = put(tmp_path, signed_set[("p12", True)])
    trust = [arg for root in roots for arg in ("--trust", str(root))]
    done = subprocess.run([sys.executable, "-m", "scanner", "report", "verify", str(path),
                           *trust], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{path}: OK: 7 check(s) passed")
    assert f"signer: CN={SIGNER_EC_CN},O=felixscan tests" in done.stdout
    assert done.stderr == ""
    wrong = subprocess.run([sys.executable, "-m", "scanner", "report", "verify", str(path),
                            "--trust", str(roots[1])], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, check=False)
    assert wrong.returncode == 1
    assert wrong.stderr == ""  # pyHanko's "Failed to build path" traceback is not shown


# --- report.signing in the config file --------------------------------------------------------


def write_config(tmp_path: Path, signing: str) -> Path:
    path = tmp_path / "felixscan.yaml"
    path.write_text("clusters:\n  - name: prod-east\n    in_cluster: true\nreport:\n"
                    "  signing:\n" + "".join(f"    {line}\n" for line in signing.splitlines()))
    return path


def test_config_signing_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, "key: keys/signer.p12\npassphrase_file: /run/secrets/pass\n"
                        "tsa_url: https://tsa.example.internal/\nreason: audit\nlocation: ci")
    signing = load_settings(path).report.signing
    assert signing == SigningSettings(
        key=(tmp_path / "keys" / "signer.p12").resolve(), cert=None, passphrase_env=None,
        passphrase_file=Path("/run/secrets/pass"), tsa_url="https://tsa.example.internal/",
        reason="audit", location="ci")
    assert load_settings(write_config(tmp_path, "key: k.pem\ncert: c.pem\n"
                                      "passphrase_env: SIGN_PASS")).report.signing == \
        SigningSettings(key=tmp_path / "k.pem", cert=tmp_path / "c.pem",
                        passphrase_env="SIGN_PASS")


@pytest.mark.parametrize(("yaml", "message"), [
    ("cert: c.pem", "report.signing.key: missing: expected the path of the private key"),
    ("key: k.p12\npassphrase: hunter2", "report.signing.passphrase: a passphrase is never "
     "written in the config file"),
    ("key: k.p12\npassphrase_env: X\npassphrase_file: f",
     "report.signing: give passphrase_env or passphrase_file, not both"),
    ("key: k.p12\npassphrase_env: hunter2 hunter2", "report.signing.passphrase_env: expected "
     "the name of an environment variable"),
    ("key: k.p12\ntsa_url: ftp://tsa", "report.signing.tsa_url: expected an http:// or "
     "https:// URL"),
    ("key: 42", "report.signing.key: expected a non-empty string"),
    ("key: k.p12\ntimestamp: yes", "report.signing.timestamp: unknown key"),
], ids=["no-key", "passphrase", "both", "env-name", "tsa-url", "key-type", "unknown"])
def test_config_signing_errors(tmp_path: Path, yaml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_settings(write_config(tmp_path, yaml))
    assert "hunter2" not in str(info.value)


def test_cli_signs_as_the_config_says(report_db: str, pki: TestPKI, tsa: LoopbackTSA,
                                      roots: list[Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "passphrase"
    secret.write_bytes(PASSPHRASE + b"\n")  # as `echo ... > file` writes it
    config = write_config(tmp_path, f"key: {pki.signer_p12}\npassphrase_file: {secret}\n"
                          f"tsa_url: {tsa.url}\nreason: nightly evidence")
    out = tmp_path / "nightly.pdf"
    code, stdout, stderr = felixscan(capsys, "report", "--config", str(config), "--db",
                                     report_db, *PERIOD_FLAGS, "--out", str(out))
    assert code == 0, stderr
    assert f"signed by CN={SIGNER_EC_CN},O=felixscan tests (PAdES B-T" in stdout
    result = verify_report(out, trust_roots=roots)
    assert result.ok and result.signed
    assert checks_of(result)["timestamp"][0] is Outcome.OK
    sig = next(f for f in (PdfReader(out).get_fields() or {}).values()
               if f.get("/T") == SIGNATURE_FIELD)["/V"]
    assert sig["/Reason"] == "nightly evidence"
    # HTML is not signed; the config's signing does not stop it being made.
    code, stdout, _ = felixscan(capsys, "report", "--config", str(config), "--db", report_db,
                                *PERIOD_FLAGS, "--out", str(tmp_path / "nightly.html"))
    assert code == 0 and "signed by" not in stdout


def test_passphrase_sources(pki: TestPKI, tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_bytes(PASSPHRASE + b"\r\n")
    from_file = SigningSettings(key=pki.signer_p12, passphrase_file=secret)
    assert read_passphrase(from_file) == PASSPHRASE
    assert check_signing(from_file).subject == f"CN={SIGNER_EC_CN},O=felixscan tests"
    from_env = SigningSettings(key=pki.signer_p12, passphrase_env="SIGN_PASS")
    assert read_passphrase(from_env, environ={"SIGN_PASS": PASSPHRASE.decode()}) == PASSPHRASE
    with pytest.raises(SigningError, match="SIGN_PASS, named for the signing key's passphrase, "
                                           "is not set or empty"):
        read_passphrase(from_env, environ={})
    secret.write_bytes(b"\n")
    with pytest.raises(SigningError, match="is empty"):
        read_passphrase(from_file)
    assert read_passphrase(SigningSettings(key=pki.signer_p12)) is None


# --- serve: signed downloads ------------------------------------------------------------------


def test_serve_downloads_are_signed(report_db: str, pki: TestPKI, tsa: LoopbackTSA,
                                    roots: list[Path], tmp_path: Path) -> None:
    secret = tmp_path / "pass"  # a mounted Secret
    secret.write_bytes(PASSPHRASE)
    signing = SigningSettings(key=pki.signer_p12, passphrase_file=secret, tsa_url=tsa.url)
    down = SigningSettings(key=pki.signer_p12, passphrase_file=secret,
                           tsa_url=closed_port_url())
    period = f"{PERIOD['since']}_{PERIOD['until']}"
    body = b""
    with Store(report_db) as store:
        caches = [ReportCache(tmp_path / "cache", entries=8, signing=signing),
                  ReportCache(tmp_path / "cache-down", entries=8, signing=down)]
        try:
            for cache, code in zip(caches, (200, 503), strict=True):
                app = create_app(store=store, auth=Auth(token=TOKEN), reports=cache,
                                 schedule=FakeSchedule(), clusters=["prod-east", "prod-west"])
                with served(app) as base:
                    r = fetch(base, f"/reports/fleet/{period}.pdf")
                    assert r.status == code, r.body[:300]
                    if code == 503:  # never an unsigned copy instead
                        assert "The report could not be signed" in r.text
                        continue
                    assert r.headers["x-felixscan-signed"] == "yes"
                    body = r.body
                    again = fetch(base, f"/reports/fleet/{period}.pdf")
                    assert again.headers["x-felixscan-cache"] == "hit"
                    assert again.body == r.body
                    html = fetch(base, f"/reports/fleet/{period}.html")
                    assert html.headers["x-felixscan-signed"] == "no"
        finally:
            for cache in caches:
                cache.close()
    path = put(tmp_path, body, "download.pdf")
    result = verify_report(path, trust_roots=roots)
    assert result.ok and result.signed, [c for c in result.checks if c.outcome != "OK"]
    if PDFSIG is not None:
        assert "- Signature Validation: Signature is Valid." in pdfsig(path, "-nocert")
    # A wrong passphrase stops serve at start-up, before any download.
    secret.write_bytes(WRONG_PASSPHRASE)
    with pytest.raises(SigningError, match="wrong passphrase"):
        ReportCache(tmp_path / "cache-3", signing=signing)
