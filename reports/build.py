"""`build_report`: database -> report data -> HTML, PDF (signed, if asked) or a machine format,
timed step by step; and `verify_report`, which checks a PDF report every way it can.

The one entry point the CLI, the web page and the demo call for a report (`render_report`
when the bytes go elsewhere than a file, e.g. stdout). The machine formats (json, sarif,
junit, ocsf, csv) are encoded by `reports.outputs` from the same report data.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from reports.integrity import (
    ATTACHMENT_NAME,
    VerifyResult,
    canonical_json,
    report_data,
    report_hash,
    verify_pdf,
)
from reports.render import check_pdf_variant, render_html, render_pdf
from scanner import __version__
from scanner.core.config import SigningSettings
from scanner.core.errors import ReportError
from scanner.db.queries.history import ReportData, load_report
from scanner.db.store import Store

if TYPE_CHECKING:
    from reports.signing import SignatureReport

Format = Literal["html", "pdf", "json", "sarif", "junit", "ocsf", "csv"]
FORMATS: tuple[Format, ...] = ("pdf", "html", "json", "sarif", "junit", "ocsf", "csv")


@dataclass(frozen=True, slots=True)
class ReportInfo:
    path: Path
    format: Format
    sha256: str  # of the report data (canonical JSON), as printed in the report
    scan_ids: tuple[int, ...]
    clusters: tuple[str, ...]
    not_scanned: tuple[str, ...]
    since: date
    until: date
    size: int  # bytes written
    timings: Mapping[str, float]  # seconds: query, hash, template, layout (PDF), sign, write
    signed: bool = False  # a PAdES signature was added (`signing`)


@dataclass(frozen=True, slots=True)
class RenderedReport:
    """A report made but not written anywhere."""

    body: bytes
    format: Format
    sha256: str  # of the report data (canonical JSON), as printed in the report
    scan_ids: tuple[int, ...]
    clusters: tuple[str, ...]
    not_scanned: tuple[str, ...]
    since: date
    until: date
    timings: dict[str, float]
    signed: bool = False


def build_report(store: Store, *, clusters: Sequence[str] = (), since: date | None = None,
                 until: date | None = None, fmt: str = "pdf", out: str | Path,
                 pdf_variant: str | None = None, now: datetime | None = None,
                 signing: SigningSettings | None = None,
                 environ: Mapping[str, str] | None = None,
                 preparer: str | None = None, owner: str | None = None) -> ReportInfo:
    """Write the report for `clusters` (all when empty) over `since`..`until` to `out`,
    signed with `signing` (a PDF only; `environ` holds a passphrase_env, default os.environ).

    Raises ReportError for an unknown cluster, an empty period, a bad format or variant, and
    SigningError (a ReportError) when it cannot be signed; nothing is written then.
    """
    r = render_report(store, clusters=clusters, since=since, until=until, fmt=fmt,
                      pdf_variant=pdf_variant, now=now, signing=signing, environ=environ,
                      preparer=preparer, owner=owner)
    t = time.perf_counter()
    path = Path(out)
    _write_atomically(path, r.body)
    r.timings["write"] = time.perf_counter() - t
    return ReportInfo(path=path, format=r.format, sha256=r.sha256, scan_ids=r.scan_ids,
                      clusters=r.clusters, not_scanned=r.not_scanned, since=r.since,
                      until=r.until, size=len(r.body), timings=r.timings, signed=r.signed)


def render_report(store: Store, *, clusters: Sequence[str] = (), since: date | None = None,
                  until: date | None = None, fmt: str = "pdf", pdf_variant: str | None = None,
                  now: datetime | None = None, signing: SigningSettings | None = None,
                  environ: Mapping[str, str] | None = None, preparer: str | None = None,
                  owner: str | None = None) -> RenderedReport:
    """The report's bytes, as `build_report` would write them; the same errors. `preparer`
    and `owner` (config `report.preparer`, `report.owner`) go on the cover, for sign-off."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}; use {', '.join(FORMATS)}")
    if pdf_variant is not None and fmt != "pdf":
        raise ReportError("--pdf-variant applies to PDF reports only")
    if signing is not None and fmt != "pdf":
        raise ReportError("signing applies to PDF reports only")
    check_pdf_variant(pdf_variant)  # before the queries: a typo should fail at once
    timings: dict[str, float] = {}
    t = time.perf_counter()
    data = replace(load_report(store, clusters=clusters, since=since, until=until, now=now),
                   preparer=preparer, owner=owner)
    timings["query"] = time.perf_counter() - t

    t = time.perf_counter()
    raw = canonical_json(data)
    digest = report_hash(raw)
    timings["hash"] = time.perf_counter() - t

    if fmt not in ("html", "pdf"):
        from reports.outputs import encode, report_document

        t = time.perf_counter()
        body = encode(report_document(data, sha256=digest), fmt).encode("utf-8")
        timings["encode"] = time.perf_counter() - t
        return _rendered(data, digest, body, fmt, timings)

    t = time.perf_counter()
    # Rendered from the hashed bytes read back, not from the query's objects: mappings come
    # in sorted key order whichever database they came from, so the pages are a function of
    # the embedded data alone and `verify_report` can render them again from the file.
    data = report_data(raw)
    html = render_html(data, digest=digest)
    timings["template"] = time.perf_counter() - t

    if fmt == "pdf":
        t = time.perf_counter()
        body = render_pdf(html, attachment_json=raw, pdf_variant=pdf_variant)
        timings["layout"] = time.perf_counter() - t
        if signing is not None:
            from reports.signing import sign_report  # pyHanko: only when signing

            t = time.perf_counter()
            body = sign_report(body, signing=signing, environ=environ)
            timings["sign"] = time.perf_counter() - t
    else:
        body = html.encode("utf-8")
    return _rendered(data, digest, body, fmt, timings, signed=signing is not None)


def _rendered(data: ReportData, digest: str, body: bytes, fmt: str,
              timings: dict[str, float], *, signed: bool = False) -> RenderedReport:
    return RenderedReport(body=body, format=next(f for f in FORMATS if f == fmt), sha256=digest,
                          scan_ids=data.scan_ids, clusters=tuple(c.name for c in data.clusters),
                          not_scanned=data.not_scanned, since=data.since, until=data.until,
                          timings=timings, signed=signed)


def _write_atomically(path: Path, body: bytes) -> None:
    # A reader (the web page, an auditor's download) never sees half a report.
    directory = path.resolve().parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from exc


# --- verifying a PDF report -----------------------------------------------------------------


class Outcome(StrEnum):
    """What became of one check of `verify_report`."""

    OK = "OK"
    FAILED = "FAILED"
    NOT_CHECKED = "not checked"  # nothing to check it on; the reason says why


@dataclass(frozen=True, slots=True)
class CheckLine:
    name: str
    outcome: Outcome
    reason: str


@dataclass(frozen=True, slots=True)
class ReportVerification:
    """Everything `verify_report` checked in one PDF; `ok` when no check failed."""

    path: Path
    checks: tuple[CheckLine, ...]  # always the same names, in the same order
    data: VerifyResult  # the embedded data and its recorded hash
    signature: SignatureReport | None  # None: the file has no signature
    details: tuple[str, ...]  # facts that are no check: who signed, when

    @property
    def ok(self) -> bool:
        return all(c.outcome is not Outcome.FAILED for c in self.checks)

    @property
    def signed(self) -> bool:
        return self.signature is not None


# reports.signing.Status, by value: that module (and pyHanko) is imported only to verify
_FROM_STATUS = {"pass": Outcome.OK, "fail": Outcome.FAILED, "absent": Outcome.NOT_CHECKED,
                "not checked": Outcome.NOT_CHECKED, "info": Outcome.NOT_CHECKED}


def verify_report(path: str | Path, *, trust_roots: Sequence[str | Path] | None = None,
                  now: datetime | None = None) -> ReportVerification:
    """Check a felixscan PDF report: its embedded data against the SHA-256 it records; its
    PAdES signature, if any (the whole file, the signer against `trust_roots`, the
    timestamp); and, when it is not signed (or its signature fails), the text of every page
    against a fresh rendering of the embedded data.

    With `trust_roots` a signature is expected: an unsigned report then fails. Raises
    ReportError when the file is unreadable or not a felixscan report (no embedded data),
    and SigningError (a ReportError) when a trust-root file cannot be read.
    """
    from reports.signing import Status, verify_signature

    path = Path(path)
    data = verify_pdf(path)
    if data.content is None:
        raise ReportError(f"{path}: not a felixscan report: it has no {ATTACHMENT_NAME} "
                          "attachment")
    try:
        pdf = path.read_bytes()
    except OSError as exc:
        raise ReportError(f"{path}: not a readable PDF: {exc.strerror or exc}") from exc
    report = verify_signature(pdf, trust_roots=trust_roots, now=now)
    checks = [CheckLine("embedded data", Outcome.OK if data.matched else Outcome.FAILED,
                        data.reason)]
    details: list[str] = []
    if report.present:
        checks += [CheckLine(label, _FROM_STATUS[c.status], c.reason)
                   for label, c in report.checks() if label not in ("signer", "signing time")]
        details += [f"signer: {report.signer.reason}",
                    f"signing time: {report.signing_time.reason}"]
        intact = (report.coverage.status is Status.PASS
                  and report.integrity.status is Status.PASS)
        checks.append(CheckLine("pages", Outcome.NOT_CHECKED, "the signature covers the whole "
                                "file, every page included") if intact else _pages(path, data))
    else:
        expected = trust_roots is not None
        checks.append(CheckLine(
            "signature", Outcome.FAILED if expected else Outcome.NOT_CHECKED,
            "the report is not signed, but trust roots were given: a signed report was "
            "expected" if expected else "the report is not signed: nothing shows who made it"))
        checks += [CheckLine(name, Outcome.NOT_CHECKED, "the report is not signed")
                   for name in ("coverage", "integrity", "trust", "certificate validity",
                                "timestamp")]
        checks.append(_pages(path, data))
    return ReportVerification(path=path, checks=tuple(checks), data=data,
                              signature=report if report.present else None,
                              details=tuple(details))


def _pages(path: Path, data: VerifyResult) -> CheckLine:
    """The text of each page of `path` against a fresh rendering of its embedded data."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    assert data.content is not None
    try:
        embedded = report_data(data.content)
    except ReportError as exc:
        return CheckLine("pages", Outcome.NOT_CHECKED, f"{exc}, so it cannot be rendered again")
    if embedded.tool_version != __version__:
        # Another version's templates lay pages out differently: a difference would prove
        # nothing either way.
        return CheckLine("pages", Outcome.NOT_CHECKED, f"made by felixscan "
                         f"{embedded.tool_version}; this is felixscan {__version__}, whose "
                         "templates may lay the pages out differently")
    html = render_html(embedded, digest=report_hash(data.content))
    fresh = render_pdf(html, attachment_json=data.content)
    try:
        mine = [_text(p.extract_text()) for p in PdfReader(path).pages]
    except (OSError, PdfReadError, ValueError, KeyError) as exc:
        return CheckLine("pages", Outcome.FAILED, f"the pages cannot be read: {exc}")
    theirs = [_text(p.extract_text()) for p in PdfReader(BytesIO(fresh)).pages]
    if mine == theirs:
        return CheckLine("pages", Outcome.OK, f"the text of all {len(mine)} pages matches a "
                         "fresh rendering of the embedded data")
    if "".join(mine) == "".join(theirs):
        return CheckLine("pages", Outcome.FAILED, "the text matches a fresh rendering of the "
                         "embedded data, but breaks into pages differently (rendered with "
                         "other fonts, or another WeasyPrint?)")
    differ = [i + 1 for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b]
    count = ("" if len(mine) == len(theirs) else
             f"the file has {len(mine)} pages where the embedded data renders to "
             f"{len(theirs)}; ")
    first = differ[0] if differ else min(len(mine), len(theirs)) + 1
    where = (f"page {first} reads {_around(mine, theirs, first - 1)}"
             if first <= min(len(mine), len(theirs)) else f"page {first} is missing")
    more = f" (pages that differ: {_compact(differ)})" if len(differ) > 1 else ""
    return CheckLine("pages", Outcome.FAILED, f"{count}{where}{more}")


def _text(text: str) -> str:
    # Line breaks and spacing are the extractor's guess, not the report's content.
    return re.sub(r"\s+", " ", text).strip()


def _around(mine: list[str], theirs: list[str], index: int) -> str:
    """Where page `index` of the file first differs from the fresh rendering, quoted."""
    a, b = mine[index], theirs[index]
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
              min(len(a), len(b)))
    start = max(0, at - 20)
    return (f"{a[start:at + 30]!r} where a fresh rendering of the embedded data reads "
            f"{b[start:at + 30]!r}")


def _compact(pages: list[int]) -> str:
    shown = ", ".join(map(str, pages[:10]))
    return shown + (f" and {len(pages) - 10} more" if len(pages) > 10 else "")
