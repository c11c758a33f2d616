"""`felixscan report`: render a PDF, HTML or machine-format report from the database, or verify
PDF reports.

    felixscan report --db sqlite:///felixscan.db --since 2026-10-01 --out q4.pdf
    felixscan report verify q4.pdf
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reports.outputs import FORMATS as OUTPUT_FORMATS
from scanner.app.exitcodes import ExitCode
from scanner.app.options import UsageError, check_out, check_readable, database_url, date_arg
from scanner.core.errors import ReportError
from scanner.telemetry import progress

REPORT_FORMATS = {".pdf": "pdf", ".html": "html", ".htm": "html", ".sarif": "sarif",
                  ".sarif.json": "sarif", ".ocsf.json": "ocsf", ".xml": "junit", ".csv": "csv"}
JSON_FORMATS = ("json", "ocsf", "sarif")  # what a plain .json --out may hold: --format says


def register(sub: Any) -> None:
    report = sub.add_parser(
        "report", help="render a PDF, HTML or machine-format report from the database (or "
        "verify a PDF)",
        description="Render a compliance report from the results database; no cluster access "
        "is needed. The machine formats (json, sarif, junit, ocsf, csv) hold each cluster's "
        "latest scan in the period, as `scan --format` prints a scan. `felixscan report verify "
        "FILE.pdf [FILE.pdf ...]` recomputes the integrity hash from the data embedded in each "
        "PDF report: exit 0 when every one matches, 1 when any does not, 2 when any cannot be "
        "read.")
    report.add_argument("action", nargs="*", metavar="verify FILE.pdf",
                        help="verify PDF reports instead of rendering one")
    report.add_argument("--format", choices=("pdf", "html", *OUTPUT_FORMATS[1:]),
                        help="pdf, html, or a machine format as `scan --format` writes it: "
                        "json, sarif, junit, ocsf, csv (default: from the extension of --out: "
                        ".pdf, .html/.htm, .sarif/.sarif.json, .ocsf.json, .xml (junit), "
                        ".csv; a plain .json needs --format json, ocsf or sarif; else pdf)")
    report.add_argument("--out", metavar="FILE", help="where to write the report (a machine "
                        "--format without --out, or --out -, goes to stdout)")
    report.add_argument("--db", metavar="URL", help="database URL (default: $FELIXSCAN_DB, "
                        "else the config file, else sqlite:///felixscan.db)")
    report.add_argument("--config", metavar="FILE", help="YAML configuration file (for its "
                        "database URL)")
    report.add_argument("--cluster", action="append", default=[], metavar="NAME",
                        help="only this cluster (repeatable)")
    report.add_argument("--since", type=date_arg, metavar="YYYY-MM-DD",
                        help="first day of the period (UTC; default: the first scan)")
    report.add_argument("--until", type=date_arg, metavar="YYYY-MM-DD",
                        help="last day of the period (UTC; default: today)")
    report.add_argument("--pdf-variant", metavar="VARIANT",
                        help="a PDF/A or PDF/UA variant for archives, e.g. pdf/a-3b")
    report.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.action:
        if len(args.action) < 2 or args.action[0] != "verify":
            raise UsageError("report takes no positional arguments except "
                         "`verify FILE.pdf [FILE.pdf ...]`")
        return _verify(args.action[1:])
    to_stdout = args.out in (None, "-")
    if to_stdout and args.format in (None, "pdf", "html"):
        raise UsageError("report needs --out FILE (or a machine --format for stdout, or "
                     "`report verify FILE.pdf`)")
    fmt = _report_format(args)
    if to_stdout:
        return _report_to_stdout(args, fmt)
    check_out(args.out)
    import reports
    from scanner.db.store import Store

    with Store(database_url(args)) as store, progress.current().step(
            f"report: rendering {args.out} ({fmt})"):
        check_readable(store)
        info = reports.build_report(store, clusters=args.cluster, since=args.since,
                                    until=args.until, fmt=fmt, out=args.out,
                                    pdf_variant=args.pdf_variant)
        from scanner.db.queries.retention import record_report

        record_report(store, fmt=info.format, sha256=info.sha256, location=str(info.path),
                      clusters=info.clusters, since=info.since, until=info.until,
                      scan_ids=info.scan_ids)
    print(f"wrote {info.path} ({info.format}, {info.size} bytes): "
          f"{len(info.clusters)} cluster(s), {info.since} to {info.until}, "
          f"{len(info.scan_ids)} scan(s); data SHA-256 {info.sha256}")
    for name in info.not_scanned:
        print(f"  note: {name} has no scan in the period")
    return ExitCode.OK


def _report_to_stdout(args: argparse.Namespace, fmt: str) -> int:
    """A machine-format report on stdout, nothing else there; not recorded as a stored report
    (there is no file to point at), so it keeps no scan from pruning."""
    from reports.build import render_report
    from scanner.db.store import Store

    with Store(database_url(args)) as store:
        check_readable(store)
        rendered = render_report(store, clusters=args.cluster, since=args.since,
                                 until=args.until, fmt=fmt, pdf_variant=args.pdf_variant)
    sys.stdout.write(rendered.body.decode("utf-8"))
    for name in rendered.not_scanned:
        print(f"  note: {name} has no scan in the period", file=sys.stderr)
    return ExitCode.OK


def _verify(paths: Sequence[str]) -> int:
    """Verify each PDF; the worst outcome decides: 2 unreadable, 1 mismatch, 0 all match."""
    from reports import verify_pdf

    worst = ExitCode.OK
    for path in paths:
        try:
            result = verify_pdf(path)
        except ReportError as exc:
            print(f"felixscan: report error: {exc}", file=sys.stderr)
            worst = max(worst, ExitCode.USAGE)
            continue
        print(f"{path}: {'OK' if result.matched else 'MISMATCH'}: {result.reason}")
        if result.expected:
            print(f"  recorded SHA-256   {result.expected}")
        if result.actual:
            print(f"  recomputed SHA-256 {result.actual}")
        if not result.matched:
            worst = max(worst, ExitCode.NON_COMPLIANT)
    return worst


def _report_format(args: argparse.Namespace) -> str:
    """--format, else the one the extension of --out names, else pdf; never a contradiction.

    A plain .json file may hold json, ocsf or sarif: --format must say which."""
    out = "" if args.out in (None, "-") else str(args.out)
    name = Path(out).name.lower()
    suffix = next((s for s in sorted(REPORT_FORMATS, key=len, reverse=True)
                   if name.endswith(s)), ".json" if name.endswith(".json") else None)
    if suffix == ".json":
        if args.format is None:
            raise UsageError(f"--out {out}: a .json file can hold json, ocsf or sarif: add "
                         "--format json, --format ocsf or --format sarif")
        if args.format not in JSON_FORMATS:
            raise UsageError(f"--format {args.format} does not match --out {out} (a .json file "
                         f"is {', '.join(JSON_FORMATS)}); drop --format or change the file name")
        return str(args.format)
    implied = REPORT_FORMATS.get(suffix or "")
    if args.format is None:
        return implied or "pdf"
    if implied is not None and implied != args.format:
        raise UsageError(f"--format {args.format} does not match --out {out} (a "
                     f"{suffix} file is {implied}); drop --format or change the file name")
    return str(args.format)
