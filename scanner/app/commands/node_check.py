"""`felixscan node-check`: from a hostNetwork DaemonSet pod, print one JSON line per interval
naming the sockets that LISTEN on the Calico metrics ports of the node (docs/node-check.md).

    felixscan node-check --once --ports 9091,9093 --node "$(hostname)"
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from scanner.app.exitcodes import ExitCode
from scanner.core.errors import ConfigError
from scanner.core.nodeview import DEFAULT_PORTS, NodeView, encode_line
from scanner.nodecheck import DEFAULT_INTERVAL_SECONDS, watch
from scanner.telemetry.logs import say

# node-check reaches no verdict, so 1 (the enum's general failure) means its one output, the
# log, is gone: the pod should be restarted rather than keep checking for nobody.
OUTPUT_CLOSED: Final = ExitCode.NON_COMPLIANT
STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
EXIT_CODES: Final = ("Exit codes: 0 --once done, or stopped by SIGTERM/SIGINT; 1 standard "
                     "output closed; 2 bad flags or no node name.")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "node-check", help="print the node's listeners on the Calico metrics ports as JSON lines",
        description="From a DaemonSet pod with hostNetwork: read /proc/net/tcp and tcp6 (the "
        "host network namespace's), find the LISTEN sockets on the given ports and print one "
        "JSON line (schema felixscan.node-view 1.x) per interval on stdout, to be read back "
        "from the pod log. Needs no Kubernetes API access, root or capabilities; with hostPID "
        "it may also name the process holding a socket. " + EXIT_CODES)
    p.add_argument(
        "--ports", type=_ports, action="append", metavar="PORT[,PORT...]",
        help="ports to look for LISTEN sockets on, repeatable (default 9091, Felix; Calico "
        "also uses 9093 Typha, 9094 kube-controllers, 9099 Felix health)")
    p.add_argument("--interval", type=_interval, default=DEFAULT_INTERVAL_SECONDS,
                   metavar="SECONDS", help="seconds between lines (default 60)")
    p.add_argument("--once", action="store_true", help="print one line and exit 0")
    p.add_argument("--node", metavar="NAME",
                   help="node name to report (default $NODE_NAME; in a DaemonSet set it from "
                   "the downward API, fieldRef spec.nodeName)")
    p.add_argument("--proc", type=Path, default=Path("/proc"), metavar="DIR",
                   help="procfs to read (default /proc; with hostNetwork its net/ is the "
                   "host's)")
    p.set_defaults(handler=run)


def _ports(text: str) -> tuple[int, ...]:
    ports: list[int] = []
    for part in text.split(","):
        item = part.strip()
        if not (item.isascii() and item.isdigit()):
            raise argparse.ArgumentTypeError(
                f"expected ports 1-65535 separated by commas, got {text!r}")
        port = int(item)
        if not 1 <= port <= 65535:
            raise argparse.ArgumentTypeError(f"port {port} is out of range 1-65535")
        ports.append(port)
    return tuple(ports)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"interval must be more than 0 seconds, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    given = args.node if args.node is not None else os.environ.get("NODE_NAME", "")
    node = given.strip()
    if not node:
        raise ConfigError("no node name: pass --node NAME or set NODE_NAME (in a DaemonSet: "
                          "env NODE_NAME from fieldRef spec.nodeName)")
    ports = sorted({port for group in args.ports or [DEFAULT_PORTS] for port in group})
    try:
        with _stop_signals_blocked() as wait_for_stop:
            watch(proc=args.proc, node=node, ports=ports, interval=args.interval,
                  once=args.once, write=_write_line, wait_for_stop=wait_for_stop)
    except BrokenPipeError:
        # Nothing reads our output any more; later flushes (at exit too) must not fail again.
        _silence_stdout()
        say("felixscan node-check: output closed")
        return OUTPUT_CLOSED
    return ExitCode.OK


def _write_line(view: NodeView) -> None:
    sys.stdout.write(encode_line(view) + "\n")
    sys.stdout.flush()  # the line must reach the log now, not when a buffer fills


@contextmanager
def _stop_signals_blocked() -> Iterator[Callable[[float], bool]]:
    """Block SIGTERM/SIGINT and hand out a wait that sleeps until one comes (sigtimedwait).

    A handler could fire in the middle of writing a line (a cut line in the log); a blocked
    signal waits until we ask for it, so a stop always lands between two whole lines. Signals
    still pending at the end are consumed: we are stopping anyway, and unblocking them would
    kill the process with status 143 (or raise KeyboardInterrupt: 130).
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield _wait_for_stop
    finally:
        while signal.sigpending() & STOP_SIGNALS:
            signal.sigtimedwait(STOP_SIGNALS, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait_for_stop(seconds: float) -> bool:
    """Sleep up to `seconds`; True when a stop signal came."""
    return signal.sigtimedwait(STOP_SIGNALS, max(seconds, 0.0)) is not None


def _silence_stdout() -> None:
    try:
        fileno = sys.stdout.fileno()
    except (OSError, ValueError):  # a replaced stdout (io.StringIO, a test capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fileno)
    os.close(devnull)
