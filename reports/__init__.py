"""Compliance reports from the database: HTML and PDF from one set of templates.

Public API::

    build_report(store, clusters=, since=, until=, fmt=, out=, pdf_variant=, signing=)
        -> ReportInfo
    render_html(data) -> str           render_pdf(html, attachment_json=, pdf_variant=) -> bytes
    canonical_json(data) -> bytes      report_hash(data) -> str
    verify_pdf(path) -> VerifyResult   pdf_variants() -> tuple[str, ...]
    verify_report(path, trust_roots=) -> ReportVerification   (data hash, signature, pages)

Only `reports/` imports Jinja2 and WeasyPrint (WeasyPrint lazily, on the PDF path only).
Signing is `reports.signing` (pyHanko), imported only where a PDF is signed or verified.

The names above are imported when first used: `reports.outputs` (what `felixscan scan` prints)
must not pay for the report builder and the database layer it reads.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reports.build import (
        CheckLine,
        Outcome,
        ReportInfo,
        ReportVerification,
        build_report,
        verify_report,
    )
    from reports.integrity import (
        ATTACHMENT_NAME,
        VerifyResult,
        canonical_json,
        report_hash,
        verify_pdf,
    )
    from reports.render import pdf_variants, render_html, render_pdf

_HOME = {
    "CheckLine": "reports.build",
    "Outcome": "reports.build",
    "ReportInfo": "reports.build",
    "ReportVerification": "reports.build",
    "build_report": "reports.build",
    "verify_report": "reports.build",
    "ATTACHMENT_NAME": "reports.integrity",
    "VerifyResult": "reports.integrity",
    "canonical_json": "reports.integrity",
    "report_hash": "reports.integrity",
    "verify_pdf": "reports.integrity",
    "pdf_variants": "reports.render",
    "render_html": "reports.render",
    "render_pdf": "reports.render",
}

__all__ = [
    "ATTACHMENT_NAME",
    "CheckLine",
    "Outcome",
    "ReportInfo",
    "ReportVerification",
    "VerifyResult",
    "build_report",
    "canonical_json",
    "pdf_variants",
    "render_html",
    "render_pdf",
    "report_hash",
    "verify_pdf",
    "verify_report",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'reports' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
