"""`felixscan trend`: per cluster and day, nodes scanned / failing / unknown and the ratio."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from typing import Any

from scanner.app.options import UsageError, common
from scanner.core.records import CONTROL_IDS


def register(sub: Any) -> None:
    p = sub.add_parser(
        "trend", help="compliance per cluster and day (or the nodes that keep failing)",
        description="Per cluster and UTC day: nodes scanned, failing and unknown, and the "
        "compliance ratio (passing / scanned), from the daily rollups. With --nodes: the nodes "
        "failing in their cluster's latest scan, longest current streak first.")
    common(p)
    p.add_argument("--cluster", action="append", default=[], metavar="NAME",
                   help="only this cluster (repeatable)")
    p.add_argument("--days", type=_positive, default=30, help="how many days back (default 30)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--control", choices=CONTROL_IDS, metavar="ID",
                   help="one control's figures per cluster and day (its targets as `nodes`; "
                   "each row gains `control`): " + ", ".join(CONTROL_IDS) + "; default: each "
                   "cluster as a whole")
    p.add_argument("--nodes", action="store_true",
                   help="list the nodes with the longest current failing streak")
    p.add_argument("--limit", type=_positive, default=50, help="with --nodes: at most N nodes")
    p.set_defaults(handler=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected a number of at least 1")
    return value


def run(args: argparse.Namespace) -> int:
    from scanner.app.options import check_readable, database_url
    from scanner.db.queries.trends import failing_streaks, trend
    from scanner.db.store import Store

    if args.nodes and args.control:
        raise UsageError("--nodes lists Felix's failing nodes; it cannot go with --control")
    with Store(database_url(args)) as store:
        check_readable(store)
        if args.nodes:
            rows = [s.as_dict() for s in failing_streaks(store, clusters=args.cluster,
                                                         limit=args.limit)]
            columns = ["cluster", "node", "verdict", "since", "scans", "last_scan_at"]
        else:
            rows = [p.as_dict() for p in trend(store, clusters=args.cluster, days=args.days,
                                               control=args.control)]
            columns = ["cluster", "day", "nodes", "failing", "unknown", "ratio", "waived"]
            if args.control:  # without it, exactly the columns trend always had
                columns.insert(1, "control")
                columns.append("status")  # a control with no target that day: compliant?
    emit(rows, columns, args.format)
    return 0


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str) -> None:
    if fmt == "json":
        json.dump([{k: r[k] for k in columns} for r in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif fmt == "csv":
        from reports.outputs import csv_cell

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([csv_cell(r[k]) for k in columns])
    else:
        cells = [[_show(r[k]) for k in columns] for r in rows]
        widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        if not rows:
            print("(no data in the period)")


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1%}"
    return str(value)
