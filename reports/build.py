"""`build_report`: database -> report data -> HTML, PDF or a machine format, timed step by step.

The one entry point the CLI, the web page and the demo call for a report (`render_report`
when the bytes go elsewhere than a file, e.g. stdout). The machine formats (json, sarif,
junit, ocsf, csv) are encoded by `reports.outputs` from the same report data.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Literal

from reports.integrity import canonical_json, report_hash
from reports.render import check_pdf_variant, render_html, render_pdf
from scanner.core.errors import ReportError
from scanner.db.queries.history import ReportData, load_report
from scanner.db.store import Store

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
    timings: Mapping[str, float]  # seconds: query, hash, template, layout (PDF), write


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


def build_report(store: Store, *, clusters: Sequence[str] = (), since: date | None = None,
                 until: date | None = None, fmt: str = "pdf", out: str | Path,
                 pdf_variant: str | None = None, now: datetime | None = None) -> ReportInfo:
    """Write the report for `clusters` (all when empty) over `since`..`until` to `out`.

    Raises ReportError for an unknown cluster, an empty period, a bad format or variant;
    nothing is written then.
    """
    r = render_report(store, clusters=clusters, since=since, until=until, fmt=fmt,
                      pdf_variant=pdf_variant, now=now)
    t = time.perf_counter()
    path = Path(out)
    _write_atomically(path, r.body)
    r.timings["write"] = time.perf_counter() - t
    return ReportInfo(path=path, format=r.format, sha256=r.sha256, scan_ids=r.scan_ids,
                      clusters=r.clusters, not_scanned=r.not_scanned, since=r.since,
                      until=r.until, size=len(r.body), timings=r.timings)


def render_report(store: Store, *, clusters: Sequence[str] = (), since: date | None = None,
                  until: date | None = None, fmt: str = "pdf", pdf_variant: str | None = None,
                  now: datetime | None = None) -> RenderedReport:
    """The report's bytes, as `build_report` would write them; the same errors."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}; use {', '.join(FORMATS)}")
    if pdf_variant is not None and fmt != "pdf":
        raise ReportError("--pdf-variant applies to PDF reports only")
    check_pdf_variant(pdf_variant)  # before the queries: a typo should fail at once
    timings: dict[str, float] = {}
    t = time.perf_counter()
    data = load_report(store, clusters=clusters, since=since, until=until, now=now)
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
    html = render_html(data, digest=digest)
    timings["template"] = time.perf_counter() - t

    if fmt == "pdf":
        t = time.perf_counter()
        body = render_pdf(html, attachment_json=raw, pdf_variant=pdf_variant)
        timings["layout"] = time.perf_counter() - t
    else:
        body = html.encode("utf-8")
    return _rendered(data, digest, body, fmt, timings)


def _rendered(data: ReportData, digest: str, body: bytes, fmt: str,
              timings: dict[str, float]) -> RenderedReport:
    return RenderedReport(body=body, format=next(f for f in FORMATS if f == fmt), sha256=digest,
                          scan_ids=data.scan_ids, clusters=tuple(c.name for c in data.clusters),
                          not_scanned=data.not_scanned, since=data.since, until=data.until,
                          timings=timings)


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
