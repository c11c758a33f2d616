"""What every `felixscan` command shares: the parser classes, -v/-q/--log-format on either side
of the subcommand, the --config/--db options, and the checks of database URLs and output files.
A command that finds its flags contradict each other raises `UsageError`.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

from scanner.app.exitcodes import ExitCode
from scanner.core.config import Settings, load_settings
from scanner.core.errors import ConfigError, StoreError
from scanner.telemetry.logs import LOG_FORMATS

# What `scan --format` takes: reports.outputs.FORMATS (a test holds them equal), named here so
# that building the parser does not import the output writers.
OUTPUT_FORMATS = ("text", "json", "sarif", "junit", "ocsf", "csv")
DEMO_DATABASE = "felixscan-demo.db"  # what `felixscan demo` writes into its --out-dir (default .)
# -v/-q given after a subcommand land in "verbose:<prog>"/"quiet:<prog>", one key per parser,
# so that argparse, copying a subcommand's results over the main ones, loses none of them.
_VERBOSE, _QUIET, _LOG_FORMAT = "verbose", "quiet", "log_format"  # so is --log-format


class UsageError(Exception):
    """Flags that cannot go together: the CLI prints the usage and this message, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"felixscan: error: {message}", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE)


class CommandParser(Parser):
    """A subcommand's parser: -v and -q work after the subcommand as well as before it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        verbosity_flags(self, suffix=f":{self.prog}")


def verbosity_flags(p: argparse.ArgumentParser, *, suffix: str = "") -> None:
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


def date_arg(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration file "
                   "(default: $FELIXSCAN_CONFIG, else the current kubeconfig context)")
    p.add_argument("--db", metavar="URL", help="database URL (default: $FELIXSCAN_DB, else the "
                   "config file, else sqlite:///felixscan.db)")


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, db_url=args.db)


def check_database_url(args: argparse.Namespace) -> None:
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


def check_out(out: str, *, flag: str = "--out") -> None:
    """Before any rendering: --out must be a file that can be created where it is named."""
    path = Path(out)
    parent = path.parent
    if path.is_dir():
        raise UsageError(f"{flag} {out} is a directory; name a file in it")
    if not parent.exists():
        raise UsageError(f"{flag} {out}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: the directory {parent} is not writable")


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
