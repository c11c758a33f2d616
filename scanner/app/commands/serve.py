"""`felixscan serve`: the scan scheduler plus the auditors' web page and JSON API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from scanner.app.options import common
from scanner.core.config import DEFAULT_DATABASE, ServeSettings, Settings, load_settings


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="run scheduled scans and serve the web page and JSON API",
        description="Run the configured clusters' scans on their cron schedule (APScheduler; "
        "one job per cluster, a database lock per cluster so replicas never scan one cluster "
        "at once) and serve the auditors' web page, report downloads and /api/ on --listen. "
        "Access needs the token in $FELIXSCAN_WEB_TOKEN or the file named by "
        "$FELIXSCAN_WEB_TOKEN_FILE (Authorization: Bearer TOKEN, or the login form); without "
        "one, serve only listens on a loopback address. Without --config it only serves the "
        "database's results. SIGTERM/SIGINT: no new scans, running ones get "
        "serve.shutdown_grace_seconds, then are recorded as aborted.")
    common(p)
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="address of the web page (default: the config's serve.listen, "
                   "else 127.0.0.1:8080; port 0 picks a free port)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from scanner.app.serve import auto_remediator, run_serve

    settings = _settings(args)
    listen = args.listen or settings.serve.listen

    def announce(address: str) -> None:
        # One line on stderr that tools (and the tests) can wait for.
        print(f"felixscan serve: listening on {address}", file=sys.stderr, flush=True)

    remediator = (auto_remediator(settings)
                  if any(c.remediation.auto and c.remediation.enabled for c in settings.clusters)
                  else None)
    result = run_serve(settings, listen=listen, announce=announce, remediate=remediator)
    if result.abandoned:
        # Scans past the grace period are still in their threads; the runs are recorded as
        # aborted and each cluster result is one transaction, so ending here loses no half.
        print(f"felixscan serve: scan run(s) {', '.join(map(str, result.aborted)) or '-'} "
              "aborted after the grace period", file=sys.stderr, flush=True)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    if args.config or os.environ.get("FELIXSCAN_CONFIG"):
        return load_settings(args.config, db_url=args.db)
    # No configuration: nothing to schedule; serve the results of the database only.
    database = args.db or os.environ.get("FELIXSCAN_DB") or DEFAULT_DATABASE
    return Settings(database=database, clusters=(), serve=ServeSettings())
