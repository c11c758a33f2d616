"""`felixscan report`: render a PDF (signed, if asked), HTML or machine-format report from the
database, or verify PDF reports.

    felixscan report --db sqlite:///felixscan.db --since 2026-10-01 --out q4.pdf \
        --sign-key signer.p12 --sign-passphrase-env SIGN_PASS --tsa-url http://tsa.internal/
    felixscan report verify q4.pdf --trust company-ca.pem --trust tsa-root.pem
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scanner.app.exitcodes import ExitCode
from scanner.app.options import (
    OUTPUT_FORMATS,
    UsageError,
    check_out,
    check_readable,
    database_url,
    date_arg,
    verbosity,
)
from scanner.core.config import ReportSettings, SigningSettings, load_settings
from scanner.core.errors import ReportError
from scanner.telemetry import progress

REPORT_FORMATS = {".pdf": "pdf", ".html": "html", ".htm": "html", ".sarif": "sarif",
                  ".sarif.json": "sarif", ".ocsf.json": "ocsf", ".xml": "junit", ".csv": "csv"}
JSON_FORMATS = ("json", "ocsf", "sarif")  # what a plain .json --out may hold: --format says
# pyHanko logs expected verdicts (a wrong trust root, an expired certificate) as warnings with
# tracebacks; the command prints its own line per check, so they are shown from -vv only.
PYHANKO_LOGGERS = ("pyhanko", "pyhanko_certvalidator")


def register(sub: Any) -> None:
    report = sub.add_parser(
        "report", help="render a PDF, HTML or machine-format report from the database (or "
        "verify a PDF)",
        description="Render a compliance report from the results database; no cluster access "
        "is needed. The machine formats (json, sarif, junit, ocsf, csv) hold each cluster's "
        "latest scan in the period, as `scan --format` prints a scan. `felixscan report verify "
        "FILE.pdf [FILE.pdf ...]` recomputes the integrity hash from the data embedded in each "
        "PDF report, checks its PAdES signature if it has one (the whole file, the signer "
        "against --trust, the timestamp) and, for an unsigned report, compares the text of "
        "every page with a fresh rendering of the embedded data; one line per check (OK, "
        "FAILED, or not checked and why): exit 0 when every file verifies, 1 when any check "
        "fails, 2 when any file cannot be read or is not a felixscan report. "
        "See docs/reports.md.")
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
                        "database URL, report.signing, report.preparer and report.owner)")
    report.add_argument("--cluster", action="append", default=[], metavar="NAME",
                        help="only this cluster (repeatable)")
    report.add_argument("--since", type=date_arg, metavar="YYYY-MM-DD",
                        help="first day of the period (UTC; default: the first scan)")
    report.add_argument("--until", type=date_arg, metavar="YYYY-MM-DD",
                        help="last day of the period (UTC; default: today)")
    report.add_argument("--pdf-variant", metavar="VARIANT",
                        help="a PDF/A or PDF/UA variant for archives, e.g. pdf/a-3b")
    sign = report.add_argument_group(
        "signing a PDF report (PAdES; default: report.signing in the --config file)")
    sign.add_argument("--sign-key", metavar="KEY", help="the private key (PEM or DER) to sign "
                      "with, or a PKCS#12 file (.p12/.pfx) holding key and certificate")
    sign.add_argument("--sign-cert", metavar="CERT", help="the signer's certificate (PEM or "
                      "DER; a PEM bundle may add its issuing CAs); not with a PKCS#12 key")
    sign.add_argument("--sign-passphrase-env", metavar="VAR", help="the environment variable "
                      "that holds the key's passphrase (never a passphrase on the command line)")
    sign.add_argument("--sign-passphrase-file", metavar="FILE", help="a file that holds the "
                      "key's passphrase (one line), e.g. a mounted Secret")
    sign.add_argument("--tsa-url", metavar="URL", help="an RFC 3161 time-stamping authority: "
                      "the signature gets a trusted timestamp (PAdES B-T)")
    sign.add_argument("--sign-reason", metavar="TEXT", help="the signature's reason")
    sign.add_argument("--sign-location", metavar="TEXT", help="the signature's location")
    report.add_argument("--trust", action="append", metavar="CA.pem", help="with `verify`: a "
                        "CA certificate (PEM or DER) the signer, and the timestamp's TSA, must "
                        "chain to (repeatable); with it an unsigned report fails")
    report.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    with _quiet_pyhanko(verbosity(args)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.action:
        if len(args.action) < 2 or args.action[0] != "verify":
            raise UsageError("report takes no positional arguments except "
                         "`verify FILE.pdf [FILE.pdf ...]`")
        given = [flag for flag, value in _sign_flags(args).items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: for signing a report, not for `report "
                             "verify` (which takes --trust)")
        return _verify(args.action[1:], args.trust)
    if args.trust:
        raise UsageError("--trust is for `report verify FILE.pdf`")
    to_stdout = args.out in (None, "-")
    if to_stdout and args.format in (None, "pdf", "html"):
        raise UsageError("report needs --out FILE (or a machine --format for stdout, or "
                     "`report verify FILE.pdf`)")
    fmt = _report_format(args)
    configured = _report_settings(args)  # read once: signing, preparer and owner
    signing = _signing(args, fmt, configured.signing)
    if to_stdout:
        return _report_to_stdout(args, fmt)
    check_out(args.out)
    import reports
    from scanner.db.store import Store

    signer = None
    if signing is not None:
        from reports.signing import check_signing

        # Before any rendering: a wrong passphrase should not cost a report's layout.
        signer = check_signing(signing)
    with Store(database_url(args)) as store, progress.current().step(
            f"report: rendering {args.out} ({fmt}{', signed' if signing else ''})"):
        check_readable(store)
        info = reports.build_report(store, clusters=args.cluster, since=args.since,
                                    until=args.until, fmt=fmt, out=args.out,
                                    pdf_variant=args.pdf_variant, signing=signing,
                                    preparer=configured.preparer, owner=configured.owner)
        from scanner.db.queries.retention import record_report

        record_report(store, fmt=info.format, sha256=info.sha256, location=str(info.path),
                      clusters=info.clusters, since=info.since, until=info.until,
                      scan_ids=info.scan_ids)
    print(f"wrote {info.path} ({info.format}, {info.size} bytes): "
          f"{len(info.clusters)} cluster(s), {info.since} to {info.until}, "
          f"{len(info.scan_ids)} scan(s); data SHA-256 {info.sha256}")
    if signer is not None and signing is not None:
        level = "B-T, timestamped" if signing.tsa_url else "B-B, no timestamp"
        print(f"  signed by {signer.subject} (PAdES {level}; certificate SHA-256 "
              f"{signer.fingerprint})")
    for name in info.not_scanned:
        print(f"  note: {name} has no scan in the period")
    return ExitCode.OK


def _sign_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"--sign-key": args.sign_key, "--sign-cert": args.sign_cert,
            "--sign-passphrase-env": args.sign_passphrase_env,
            "--sign-passphrase-file": args.sign_passphrase_file, "--tsa-url": args.tsa_url,
            "--sign-reason": args.sign_reason, "--sign-location": args.sign_location}


def _report_settings(args: argparse.Namespace) -> ReportSettings:
    """`report:` of the config file, when one is given (--config or $FELIXSCAN_CONFIG): its
    signing, and who prepared the report and who owns the control."""
    if args.config or os.environ.get("FELIXSCAN_CONFIG"):
        return load_settings(args.config).report
    return ReportSettings()


def _signing(args: argparse.Namespace, fmt: str,
             configured: SigningSettings | None) -> SigningSettings | None:
    """How to sign: the --sign-* flags, else `report.signing` of the config file; flags win.

    The key, its certificate and its passphrase go together: from the flags when --sign-key
    is given, else from the file. --tsa-url, --sign-reason and --sign-location override the
    file's values either way."""
    flags = _sign_flags(args)
    given = [flag for flag, value in flags.items() if value is not None]
    if args.sign_key is None:
        bound = [f for f in given if f in ("--sign-cert", "--sign-passphrase-env",
                                           "--sign-passphrase-file")]
        if bound:
            raise UsageError(f"{', '.join(bound)} needs --sign-key")
    if args.sign_passphrase_env is not None and args.sign_passphrase_file is not None:
        raise UsageError("give --sign-passphrase-env or --sign-passphrase-file, not both")
    if args.sign_passphrase_env is not None and not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", args.sign_passphrase_env):
        # Not quoted back: it may be the passphrase itself, typed where the name should be.
        raise UsageError("--sign-passphrase-env takes the NAME of an environment variable "
                         "(letters, digits, _), not the passphrase")
    if given and fmt != "pdf":
        raise UsageError(f"{', '.join(given)}: only PDF reports are signed (this is {fmt})")
    if args.sign_key is not None:
        base = SigningSettings(
            key=Path(args.sign_key),
            cert=Path(args.sign_cert) if args.sign_cert else None,
            passphrase_env=args.sign_passphrase_env,
            passphrase_file=(Path(args.sign_passphrase_file)
                             if args.sign_passphrase_file else None),
            tsa_url=configured.tsa_url if configured else None,
            reason=configured.reason if configured else None,
            location=configured.location if configured else None)
    elif configured is not None:
        if fmt != "pdf":
            return None  # the file's signing is for PDF reports; an HTML one is not signed
        base = configured
    elif given:
        raise UsageError(f"{', '.join(given)}: nothing to sign with; add --sign-key (or "
                         "report.signing in the --config file)")
    else:
        return None
    return SigningSettings(
        key=base.key, cert=base.cert, passphrase_env=base.passphrase_env,
        passphrase_file=base.passphrase_file,
        tsa_url=args.tsa_url if args.tsa_url is not None else base.tsa_url,
        reason=args.sign_reason if args.sign_reason is not None else base.reason,
        location=args.sign_location if args.sign_location is not None else base.location)


@contextmanager
def _quiet_pyhanko(level: int) -> Iterator[None]:
    if level >= 2:  # -vv: the libraries' logs too
        yield
        return
    saved = {name: logging.getLogger(name).level for name in PYHANKO_LOGGERS}
    for name in PYHANKO_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, value in saved.items():
            logging.getLogger(name).setLevel(value)


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


def _verify(paths: Sequence[str], trust: Sequence[str] | None) -> int:
    """Verify each PDF; the worst outcome decides: 2 unreadable or not a felixscan report,
    1 a check failed, 0 every file verified. An unreadable --trust file stops at once (2)."""
    from reports import Outcome, verify_report
    from reports.signing import load_trust_roots

    if trust:
        load_trust_roots(trust)  # SigningError (exit 2) before any file is looked at
    worst = ExitCode.OK
    for path in paths:
        try:
            result = verify_report(path, trust_roots=trust)
        except ReportError as exc:
            print(f"felixscan: report error: {exc}", file=sys.stderr)
            worst = max(worst, ExitCode.USAGE)
            continue
        failed = [c.name for c in result.checks if c.outcome is Outcome.FAILED]
        unchecked = [c.name for c in result.checks if c.outcome is Outcome.NOT_CHECKED]
        passed = len(result.checks) - len(failed) - len(unchecked)
        if failed:
            print(f"{path}: FAILED: {', '.join(failed)}")
            worst = max(worst, ExitCode.NON_COMPLIANT)
        else:
            print(f"{path}: OK: {passed} check(s) passed"
                  + (f", not checked: {', '.join(unchecked)}" if unchecked else ""))
        width = max(len(c.name) for c in result.checks)
        for c in result.checks:
            print(f"  {c.name:<{width}}  {c.outcome:<11}  {c.reason}")
        for line in result.details:
            print(f"  {line}")
        if result.data.expected:
            print(f"  recorded SHA-256   {result.data.expected}")
        if result.data.actual:
            print(f"  recomputed SHA-256 {result.data.actual}")
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
