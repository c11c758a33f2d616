"""The `felixscan` command line: builds the parser from `scanner.app.commands` and runs one
command, the only place where felixscan's errors become messages and exit codes
(`scanner.app.exitcodes.ExitCode`: 0 compliant, 1 non-compliant, 2 usage or configuration
error, 3 a cluster could not be scanned, 4 the results database cannot be used).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from scanner.app.commands import COMMANDS
from scanner.app.exitcodes import ExitCode, for_error
from scanner.app.options import (
    CommandParser,
    Parser,
    UsageError,
    check_database_url,
    log_format,
    verbosity,
    verbosity_flags,
)
from scanner.core.errors import ConfigError, FelixscanError, ReportError, StoreError
from scanner.telemetry import progress
from scanner.telemetry.logs import configured, say

PROGRESS_COMMANDS = ("scan", "demo", "report", "remediate")  # these show progress on stderr
# Re-exported, they lived here; imported when asked for. The command line imports what the
# command it runs needs, no more: `felixscan scan` must reach the API server quickly.
_REEXPORTED = {"cluster_json": "reports.outputs", "summary_line": "reports.outputs"}


def __getattr__(name: str) -> Any:
    home = _REEXPORTED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(home), name)


class _Version(argparse.Action):
    """--version, which reads the installed version only when asked (importlib.metadata is
    not free)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from scanner import __version__
        parser._print_message(f"felixscan {__version__}\n", sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="felixscan", description=(
        "Prove that the Calico Felix metrics endpoint (TCP 9091) is disabled and unreachable "
        "on every node of every cluster."))
    parser.add_argument("--version", action=_Version,
                        help="show program's version number and exit")
    verbosity_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for command in COMMANDS:
        command.register(sub)
    parser.set_defaults(parser=parser)
    return parser


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
        check_database_url(args)
        return int(args.handler(args))
    except UsageError as exc:
        parser.error(str(exc))
    except ConfigError as exc:
        say(f"felixscan: configuration error: {exc}")
        return for_error(exc)
    except StoreError as exc:
        say(f"felixscan: database error: {exc}")
        return for_error(exc)
    except ReportError as exc:
        say(f"felixscan: report error: {exc}")
        return for_error(exc)
    except FelixscanError as exc:
        say(f"felixscan: {exc}")
        return for_error(exc)
    except KeyboardInterrupt:
        say("felixscan: interrupted")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`felixscan trend | head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    return ExitCode.USAGE  # parser.error exits; this is for type checkers
