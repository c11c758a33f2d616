"""The `felixscan` command line: parses flags, loads settings, calls one library function.

Only this module turns felixscan's errors into messages and exit codes:
0 compliant, 1 non-compliant, 2 usage or configuration error, 3 a cluster could not be
scanned, 4 the results database cannot be used.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

from reports.outputs import FORMATS as OUTPUT_FORMATS
from reports.outputs import cluster_json as cluster_json  # noqa: PLC0414 (re-exported:
from reports.outputs import summary_line as summary_line  # noqa: PLC0414 they lived here)
from scanner import __version__
from scanner.core.config import Settings, load_settings
from scanner.core.errors import ConfigError, FelixscanError, ReportError, StoreError
from scanner.telemetry import progress
from scanner.telemetry.logs import LOG_FORMATS, configured, say

LOCK_WAIT_SECONDS = 60.0  # how long `scan` waits for another process scanning the same cluster
EXIT_OK, EXIT_NON_COMPLIANT, EXIT_USAGE, EXIT_CLUSTER_ERROR, EXIT_STORE = 0, 1, 2, 3, 4
EXIT_CODES = (
    "Exit codes: 0 all compliant, 1 at least one non-compliant, 2 usage or configuration error, "
    "3 at least one cluster could not be scanned (none non-compliant), 4 the results database "
    "cannot be used or a result could not be stored (this wins over 1 and 3: the record is "
    "incomplete).")
DEMO_DATABASE = "felixscan-demo.db"  # what `felixscan demo` writes into its --out-dir (default .)
REPORT_FORMATS = {".pdf": "pdf", ".html": "html", ".htm": "html", ".sarif": "sarif",
                  ".sarif.json": "sarif", ".ocsf.json": "ocsf", ".xml": "junit", ".csv": "csv"}
JSON_FORMATS = ("json", "ocsf", "sarif")  # what a plain .json --out may hold: --format says
# -v/-q given after a subcommand land in "verbose:<prog>"/"quiet:<prog>", one key per parser,
# so that argparse, copying a subcommand's results over the main ones, loses none of them.
_VERBOSE, _QUIET, _LOG_FORMAT = "verbose", "quiet", "log_format"  # so is --log-format
PROGRESS_COMMANDS = ("scan", "demo", "report", "remediate")  # these show progress on stderr


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"felixscan: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _CommandParser(_Parser):
    """A subcommand's parser: -v and -q work after the subcommand as well as before it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _verbosity_flags(self, suffix=f":{self.prog}")


def _verbosity_flags(p: argparse.ArgumentParser, *, suffix: str = "") -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, dest=_VERBOSE + suffix,
                   help="log more to stderr: each cluster's phases (-vv for debug and the "
                   "libraries' logs, -vvv with SQL)")
    p.add_argument("-q", "--quiet", action="count", default=0, dest=_QUIET + suffix,
                   help="log errors only (no warnings, no progress)")
    p.add_argument("--log-format", choices=LOG_FORMATS, dest=_LOG_FORMAT + suffix,
                   help="text (default), or json: one JSON object a line on stderr (time, "
                   "level, logger, message, cluster, phase, scan_id)")


def verbosity(args: argparse.Namespace) -> int:
    """-v minus -q, counted wherever they were given (before or after the subcommand)."""
    counts = vars(args)
    return (sum(int(v) for k, v in counts.items() if k.split(":")[0] == _VERBOSE)
            - sum(int(v) for k, v in counts.items() if k.split(":")[0] == _QUIET))


def log_format(args: argparse.Namespace) -> str:
    """--log-format, wherever it was given; after the subcommand wins over before it."""
    given = [v for k, v in vars(args).items() if k.split(":")[0] == _LOG_FORMAT and v]
    return str(given[-1]) if given else "text"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="felixscan", description=(
        "Prove that the Calico Felix metrics endpoint (TCP 9091) is disabled and unreachable "
        "on every node of every cluster."))
    parser.add_argument("--version", action="version", version=f"felixscan {__version__}")
    _verbosity_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    scan = sub.add_parser("scan", help="scan clusters once and store the results",
                          description="Scan the configured clusters (or the current kubeconfig "
                          "context) once and store every result. " + EXIT_CODES)
    _common(scan)
    scan.add_argument("--cluster", action="append", default=[], metavar="NAME",
                      help="scan only this configured cluster (repeatable)")
    scan.add_argument("--json", action="store_true",
                      help="print one JSON document (the same as --format json)")
    scan.add_argument("--format", choices=OUTPUT_FORMATS, dest="output_format",
                      help="text (default: a summary per cluster); json (the versioned "
                      "document, schema in scanner/schemas/scan-result.schema.json); sarif "
                      "(SARIF 2.1.0); junit (JUnit XML: a suite per cluster, a case per "
                      "node); ocsf (OCSF Compliance Finding events); csv (a row per finding)")
    scan.add_argument("--output", metavar="FILE",
                      help="write the --format output to FILE (atomically) instead of stdout; "
                      "stdout then shows the text summary")

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
    report.add_argument("--since", type=_date, metavar="YYYY-MM-DD",
                        help="first day of the period (UTC; default: the first scan)")
    report.add_argument("--until", type=_date, metavar="YYYY-MM-DD",
                        help="last day of the period (UTC; default: today)")
    report.add_argument("--pdf-variant", metavar="VARIANT",
                        help="a PDF/A or PDF/UA variant for archives, e.g. pdf/a-3b")

    demo = sub.add_parser("demo", help="scan an emulated fleet and write demo reports",
                          description="A first look without a cluster: start an emulated fleet "
                          "on 127.0.0.x, replay a week of nightly scans into a fresh SQLite "
                          "database, and write demo-report.html and demo-report.pdf.")
    demo.add_argument("--out-dir", default=".", metavar="DIR",
                      help="where to write the database and the reports (default: here)")
    demo.add_argument("--days", type=int, default=7, help="nights to replay (at least 5)")

    from scanner.app.commands import modules

    for module in modules():
        module.add_parser(sub, _common)

    db = sub.add_parser("db", help="manage the results database",
                        description="Manage the results database schema.")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=_CommandParser)
    for name, text in (("upgrade", "create or upgrade the schema to this version (Alembic)"),
                       ("current", "print the schema revision of the database")):
        p = db_sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _common(p)
    prune = db_sub.add_parser(
        "prune", help="delete raw node probes older than N days (keeps rollups and reports)",
        description="Delete node probes and node-level findings of scans that started more than "
        "--keep-days days ago, in small batches. Daily rollups, cluster results and every scan "
        "that a stored report refers to are kept. Nothing is deleted without --keep-days.")
    _common(prune)
    prune.add_argument("--keep-days", type=int, metavar="N", help="keep the last N days of probes")
    prune.add_argument("--batch-size", type=int, default=5000, help="rows per transaction")
    prune.add_argument("--dry-run", action="store_true", help="count what would be removed")
    return parser


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration file "
                   "(default: $FELIXSCAN_CONFIG, else the current kubeconfig context)")
    p.add_argument("--db", metavar="URL", help="database URL (default: $FELIXSCAN_DB, else the "
                   "config file, else sqlite:///felixscan.db)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level, fmt = verbosity(args), log_format(args)
    # Logs and progress go to stderr, never stdout (--json, reports); JSON logs get no
    # redrawn line, and -q no progress at all. Both are taken away again at the end.
    with configured(verbosity=level, fmt=fmt, stream=sys.stderr), progress.session(
            sys.stderr, title=args.command, enabled=args.command in PROGRESS_COMMANDS
            and level >= 0, terminal=False if fmt == "json" else None):
        return _run(args, parser)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        _check_database_url(args)
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args))
        if args.command == "scan":
            return cmd_scan(args, parser)
        if args.command == "db":
            return cmd_db(args)
        if args.command == "report":
            return cmd_report(args, parser)
        if args.command == "demo":
            return cmd_demo(args)
    except ConfigError as exc:
        say(f"felixscan: configuration error: {exc}")
        return EXIT_USAGE
    except StoreError as exc:
        say(f"felixscan: database error: {exc}")
        return EXIT_STORE
    except ReportError as exc:
        say(f"felixscan: report error: {exc}")
        return EXIT_USAGE
    except FelixscanError as exc:
        say(f"felixscan: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        say("felixscan: interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`felixscan trend | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, db_url=args.db)


def _check_database_url(args: argparse.Namespace) -> None:
    """A database given as a bare path (`--db foo.db`) is a usage error with the URL to use."""
    if not hasattr(args, "db") or (args.command == "report" and args.action):
        return  # no database here (`demo`, `report verify`)
    if args.db:
        if "://" not in args.db:
            raise ConfigError(f"--db {args.db} is a file path, not a database URL; for a SQLite "
                              f"file use --db sqlite:///{args.db} (PostgreSQL: --db "
                              "postgresql+psycopg://USER@HOST/DB)")
        return
    env = os.environ.get("FELIXSCAN_DB")
    if env and "://" not in env:
        raise ConfigError(f"$FELIXSCAN_DB is {env}, a file path, not a database URL; for a "
                          f"SQLite file set FELIXSCAN_DB=sqlite:///{env}")


def check_readable(store: Any) -> None:
    """`store.check_readable()`; a missing default database points at the demo's, if there."""
    from scanner.db.store import redact_url

    try:
        store.check_readable()
    except StoreError as exc:
        missing = f"database {redact_url(store.url)} does not exist"
        if str(exc) == missing and Path(DEMO_DATABASE).is_file() and \
                Path(str(store.engine.url.database)).resolve() != Path(DEMO_DATABASE).resolve():
            raise StoreError(f"{missing}; `felixscan demo` wrote {DEMO_DATABASE} here: add "
                             f"--db sqlite:///{DEMO_DATABASE}") from exc
        raise


def cmd_scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.json and args.output_format not in (None, "json"):
        parser.error(f"--json is --format json; it cannot go with --format {args.output_format}")
    fmt = "json" if args.json else args.output_format or "text"
    to_file = args.output not in (None, "-")
    if to_file:
        _check_out(args.output, parser, flag="--output")  # before scanning, not after
    settings = _settings(args).select(args.cluster)
    from contextlib import nullcontext, redirect_stdout

    from reports.outputs import render_scan, scan_text, write_output
    from scanner.db.store import Store
    from scanner.scan import run_scan

    # A machine format on stdout is all of stdout: anything printed on the way goes to stderr.
    guard = redirect_stdout(sys.stderr) if fmt != "text" and not to_file else nullcontext()
    with guard, Store(settings.database) as store:
        outcome = run_scan(settings, store=store, trigger="cli", lock_wait=LOCK_WAIT_SECONDS)
    body = render_scan(fmt, scan_id=outcome.scan_id, started_at=outcome.started_at,
                       finished_at=outcome.finished_at, clusters=outcome.clusters)
    code = outcome.exit_code
    if not to_file:
        sys.stdout.write(body)
    else:
        try:
            size = write_output(args.output, body)
        except OSError as exc:
            print(f"felixscan: cannot write --output {args.output}: {exc.strerror or exc}",
                  file=sys.stderr)
            size, code = -1, max(code, EXIT_USAGE)  # the database's 4 still wins
        if fmt != "text":
            sys.stdout.write(scan_text(outcome.clusters))
        if size >= 0:
            print(f"wrote {args.output} ({fmt}, {size} bytes)")
    for cluster, reason in outcome.store_errors:
        say(f"felixscan: {cluster}: result NOT stored: {reason}")
    return code


def cmd_db(args: argparse.Namespace) -> int:
    from scanner.db.store import Store, redact_url

    settings = database_url(args)
    if args.db_command == "prune":
        return _prune(args, settings)
    with Store(settings) as store:
        if args.db_command == "upgrade":
            before, after = store.upgrade()
            if before == after:
                print(f"database {redact_url(settings)} already at revision {after}")
            else:
                print(f"database {redact_url(settings)} upgraded from {before or 'empty'} "
                      f"to {after}")
        else:
            print(store.current() or "empty (run `felixscan db upgrade`)")
    return EXIT_OK


def cmd_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.action:
        if len(args.action) < 2 or args.action[0] != "verify":
            parser.error("report takes no positional arguments except "
                         "`verify FILE.pdf [FILE.pdf ...]`")
        return _verify(args.action[1:])
    to_stdout = args.out in (None, "-")
    if to_stdout and args.format in (None, "pdf", "html"):
        parser.error("report needs --out FILE (or a machine --format for stdout, or "
                     "`report verify FILE.pdf`)")
    fmt = _report_format(args, parser)
    if to_stdout:
        return _report_to_stdout(args, fmt)
    _check_out(args.out, parser)
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
    return EXIT_OK


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
    return EXIT_OK


def _verify(paths: Sequence[str]) -> int:
    """Verify each PDF; the worst outcome decides: 2 unreadable, 1 mismatch, 0 all match."""
    from reports import verify_pdf

    worst = EXIT_OK
    for path in paths:
        try:
            result = verify_pdf(path)
        except ReportError as exc:
            print(f"felixscan: report error: {exc}", file=sys.stderr)
            worst = max(worst, EXIT_USAGE)
            continue
        print(f"{path}: {'OK' if result.matched else 'MISMATCH'}: {result.reason}")
        if result.expected:
            print(f"  recorded SHA-256   {result.expected}")
        if result.actual:
            print(f"  recomputed SHA-256 {result.actual}")
        if not result.matched:
            worst = max(worst, EXIT_NON_COMPLIANT)
    return worst


def _report_format(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """--format, else the one the extension of --out names, else pdf; never a contradiction.

    A plain .json file may hold json, ocsf or sarif: --format must say which."""
    out = "" if args.out in (None, "-") else str(args.out)
    name = Path(out).name.lower()
    suffix = next((s for s in sorted(REPORT_FORMATS, key=len, reverse=True)
                   if name.endswith(s)), ".json" if name.endswith(".json") else None)
    if suffix == ".json":
        if args.format is None:
            parser.error(f"--out {out}: a .json file can hold json, ocsf or sarif: add "
                         "--format json, --format ocsf or --format sarif")
        if args.format not in JSON_FORMATS:
            parser.error(f"--format {args.format} does not match --out {out} (a .json file "
                         f"is {', '.join(JSON_FORMATS)}); drop --format or change the file name")
        return str(args.format)
    implied = REPORT_FORMATS.get(suffix or "")
    if args.format is None:
        return implied or "pdf"
    if implied is not None and implied != args.format:
        parser.error(f"--format {args.format} does not match --out {out} (a "
                     f"{suffix} file is {implied}); drop --format or change the file name")
    return str(args.format)


def _check_out(out: str, parser: argparse.ArgumentParser, *, flag: str = "--out") -> None:
    """Before any rendering: --out must be a file that can be created where it is named."""
    path = Path(out)
    parent = path.parent
    if path.is_dir():
        parser.error(f"{flag} {out} is a directory; name a file in it")
    if not parent.exists():
        parser.error(f"{flag} {out}: the directory {parent} does not exist")
    if not parent.is_dir():
        parser.error(f"{flag} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"{flag} {out}: the directory {parent} is not writable")


def cmd_demo(args: argparse.Namespace) -> int:
    from scanner.app.demo import run_demo

    result = run_demo(Path(args.out_dir), days=args.days)
    print(f"\nDatabase: {result.database}\nHTML report: {result.html}\nPDF report: {result.pdf}")
    return EXIT_OK


def _prune(args: argparse.Namespace, url: str) -> int:
    from scanner.db.queries.retention import prune
    from scanner.db.store import Store

    if args.keep_days is None:
        print("felixscan db prune deletes nothing without --keep-days N", file=sys.stderr)
        return EXIT_USAGE
    if args.keep_days < 1 or args.batch_size < 1:
        print("felixscan: --keep-days and --batch-size must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    with Store(url) as store:
        check_readable(store)
        result = prune(store, keep_days=args.keep_days, batch_size=args.batch_size,
                       dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {result.probes} node probes and {result.findings} node findings of "
          f"{result.scans} cluster scans before {result.cutoff:%Y-%m-%d %H:%M} UTC; kept "
          f"{result.kept_for_reports} older scans that stored reports refer to; daily rollups "
          "kept")
    return EXIT_OK


def database_url(args: argparse.Namespace) -> str:
    """The database URL without requiring clusters: --db, $FELIXSCAN_DB, the file, the default."""
    if args.db:
        return str(args.db)
    if os.environ.get("FELIXSCAN_DB"):
        return os.environ["FELIXSCAN_DB"]
    if args.config or os.environ.get("FELIXSCAN_CONFIG"):
        return load_settings(args.config).database
    from scanner.core.config import DEFAULT_DATABASE

    return DEFAULT_DATABASE
