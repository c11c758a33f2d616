"""`felixscan scan`: scan the configured clusters once, store every result, print or write it.

    felixscan scan --config felixscan.yaml --format sarif --output scan.sarif
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from typing import Any

from scanner.app.exitcodes import EXIT_CODES, ExitCode, for_scan
from scanner.app.options import OUTPUT_FORMATS, UsageError, check_out, common, settings_of
from scanner.telemetry.logs import say

LOCK_WAIT_SECONDS = 60.0  # how long `scan` waits for another process scanning the same cluster


def register(sub: Any) -> None:
    scan = sub.add_parser("scan", help="scan clusters once and store the results",
                          description="Scan the configured clusters (or the current kubeconfig "
                          "context) once and store every result. " + EXIT_CODES)
    common(scan)
    scan.add_argument("--cluster", action="append", default=[], metavar="NAME",
                      help="scan only this configured cluster (repeatable)")
    scan.add_argument("--json", action="store_true",
                      help="print one JSON document (the same as --format json)")
    scan.add_argument("--format", choices=OUTPUT_FORMATS, dest="output_format",
                      help="text (default: a summary per cluster, a line per control); json "
                      "(the versioned document, schema in "
                      "reports/schemas/scan-result.schema.json); sarif (SARIF 2.1.0); junit "
                      "(JUnit XML: a suite per cluster, a case per node, per control and per "
                      "control target); ocsf (OCSF Compliance Finding events); csv (a row per "
                      "finding); every format names each finding's control")
    scan.add_argument("--vantage", metavar="NAME", type=_vantage,
                      help="name where the probes come from, recorded with the scan (e.g. "
                      "corp-network, pod-network; default: $FELIXSCAN_VANTAGE, else the "
                      "config's vantage, else this host's name); a node fails if any "
                      "vantage's latest scan fails it")
    scan.add_argument("--output", metavar="FILE",
                      help="write the --format output to FILE (atomically) instead of stdout; "
                      "stdout then shows the text summary")
    scan.set_defaults(handler=run)


def _vantage(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise argparse.ArgumentTypeError("expected a short name of letters, digits, '.', '_' "
                                         "or '-' (at most 64), e.g. corp-network")
    return text


def run(args: argparse.Namespace) -> int:
    if args.json and args.output_format not in (None, "json"):
        raise UsageError(f"--json is --format json; it cannot go with --format "
                         f"{args.output_format}")
    fmt = "json" if args.json else args.output_format or "text"
    to_file = args.output not in (None, "-")
    if to_file:
        check_out(args.output, flag="--output")  # before scanning, not after
    settings = settings_of(args).select(args.cluster)
    if args.vantage:
        settings = replace(settings, vantage=args.vantage)
    from contextlib import nullcontext, redirect_stdout

    from scanner.db.store import Store
    from scanner.scan import run_scan

    # A machine format on stdout is all of stdout: anything printed on the way goes to stderr.
    guard = redirect_stdout(sys.stderr) if fmt != "text" and not to_file else nullcontext()
    with guard, Store(settings.database) as store:
        outcome = run_scan(settings, store=store, trigger="cli", lock_wait=LOCK_WAIT_SECONDS)
    from reports.outputs import render_scan, scan_text, write_output

    body = render_scan(fmt, scan_id=outcome.scan_id, started_at=outcome.started_at,
                       finished_at=outcome.finished_at, clusters=outcome.clusters,
                       vantage=outcome.vantage)
    code = for_scan(outcome.status)
    if not to_file:
        sys.stdout.write(body)
    else:
        try:
            size = write_output(args.output, body)
        except OSError as exc:
            print(f"felixscan: cannot write --output {args.output}: {exc.strerror or exc}",
                  file=sys.stderr)
            size, code = -1, max(code, ExitCode.USAGE)  # the database's 4 still wins
        if fmt != "text":
            sys.stdout.write(scan_text(outcome.clusters))
        if size >= 0:
            print(f"wrote {args.output} ({fmt}, {size} bytes)")
    for cluster, reason in outcome.store_errors:
        say(f"felixscan: {cluster}: result NOT stored: {reason}")
    return code
