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
"""

from reports.build import (
    CheckLine,
    Outcome,
    ReportInfo,
    ReportVerification,
    build_report,
    verify_report,
)
from reports.integrity import ATTACHMENT_NAME, VerifyResult, canonical_json, report_hash, verify_pdf
from reports.render import pdf_variants, render_html, render_pdf

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
