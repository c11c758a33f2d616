"""`felixscan demo`: a first look without a cluster (an emulated fleet on 127.0.0.x).

    felixscan demo --out-dir /tmp/felixscan-demo
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scanner.app.exitcodes import ExitCode


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="scan an emulated fleet and write demo reports",
                          description="A first look without a cluster: start an emulated fleet "
                          "on 127.0.0.x, replay a week of nightly scans into a fresh SQLite "
                          "database, and write demo-report.html and demo-report.pdf.")
    demo.add_argument("--out-dir", default=".", metavar="DIR",
                      help="where to write the database and the reports (default: here)")
    demo.add_argument("--days", type=int, default=7, help="nights to replay (at least 5)")
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from scanner.app.demo import run_demo

    result = run_demo(Path(args.out_dir), days=args.days)
    print(f"\nDatabase: {result.database}\nHTML report: {result.html}\nPDF report: {result.pdf}")
    return ExitCode.OK
