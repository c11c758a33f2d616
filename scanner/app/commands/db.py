"""`felixscan db`: create or upgrade the schema, show its revision, prune old node probes.

    felixscan db upgrade --db postgresql+psycopg://felixscan@db/felixscan
    felixscan db prune --keep-days 400 --dry-run
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from scanner.app.exitcodes import ExitCode
from scanner.app.options import CommandParser, check_readable, common, database_url


def register(sub: Any) -> None:
    db = sub.add_parser("db", help="manage the results database",
                        description="Manage the results database schema.")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=CommandParser)
    for name, text in (("upgrade", "create or upgrade the schema to this version (Alembic)"),
                       ("current", "print the schema revision of the database")):
        p = db_sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        common(p)
    prune = db_sub.add_parser(
        "prune", help="delete raw node probes older than N days (keeps rollups and reports)",
        description="Delete node probes and node-level findings of scans that started more than "
        "--keep-days days ago, in small batches. Daily rollups, cluster results and every scan "
        "that a stored report refers to are kept. Nothing is deleted without --keep-days.")
    common(prune)
    prune.add_argument("--keep-days", type=int, metavar="N", help="keep the last N days of probes")
    prune.add_argument("--batch-size", type=int, default=5000, help="rows per transaction")
    prune.add_argument("--dry-run", action="store_true", help="count what would be removed")
    db.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
    return ExitCode.OK


def _prune(args: argparse.Namespace, url: str) -> int:
    from scanner.db.queries.retention import prune
    from scanner.db.store import Store

    if args.keep_days is None:
        print("felixscan db prune deletes nothing without --keep-days N", file=sys.stderr)
        return ExitCode.USAGE
    if args.keep_days < 1 or args.batch_size < 1:
        print("felixscan: --keep-days and --batch-size must be at least 1", file=sys.stderr)
        return ExitCode.USAGE
    with Store(url) as store:
        check_readable(store)
        result = prune(store, keep_days=args.keep_days, batch_size=args.batch_size,
                       dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {result.probes} node probes and {result.findings} node findings of "
          f"{result.scans} cluster scans before {result.cutoff:%Y-%m-%d %H:%M} UTC; kept "
          f"{result.kept_for_reports} older scans that stored reports refer to; daily rollups "
          "kept")
    return ExitCode.OK
