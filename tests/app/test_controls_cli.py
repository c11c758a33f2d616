"""`felixscan trend --control ID` from the real CLI: each row gains `control` (and the day's
status), and without it the output is what it always was."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scanner.db.store import Store
from tests.helpers.scan_harness import felixscan
from tests.reports.controls_data import lean, tri

TODAY = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('trend') / 'felixscan.db'}"
    with Store(url) as store:
        store.upgrade()
        for back in (2, 1, 0):
            at = TODAY - timedelta(days=back, minutes=5)
            run = store.begin_run(trigger="test", started_at=at)
            for result in (tri(at), lean(at)):
                store.save_cluster(run, result)
            store.finish_run(run, finished_at=at)
    return url


def test_trend_without_control_is_unchanged(db: str) -> None:
    out = felixscan("trend", "--db", db, "--days", "3", "--format", "json")
    assert out.code == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 6
    assert all(list(r) == ["cluster", "day", "nodes", "failing", "unknown", "ratio", "waived"]
               for r in rows)
    tri_today = [r for r in rows if r["cluster"] == "tri"][-1]
    assert (tri_today["nodes"], tri_today["failing"]) == (3, 1)  # Felix's nodes
    table = felixscan("trend", "--db", db, "--days", "1")
    assert table.stdout.splitlines()[0].split() == ["cluster", "day", "nodes", "failing",
                                                    "unknown", "ratio", "waived"]


def test_trend_of_one_control(db: str) -> None:
    out = felixscan("trend", "--db", db, "--days", "3", "--control", "typha-metrics",
                    "--format", "json")
    assert out.code == 0, out.stderr
    rows = json.loads(out.stdout)
    assert all(list(r) == ["cluster", "control", "day", "nodes", "failing", "unknown", "ratio",
                           "waived", "status"] for r in rows)
    assert {r["control"] for r in rows} == {"typha-metrics"}
    by_cluster = {r["cluster"]: r for r in rows}  # the last day of each
    assert (by_cluster["tri"]["nodes"], by_cluster["tri"]["failing"],
            by_cluster["tri"]["status"]) == (2, 2, "non_compliant")
    # not installed: no target, compliant (the status says so where the ratio cannot)
    assert (by_cluster["lean"]["nodes"], by_cluster["lean"]["ratio"],
            by_cluster["lean"]["status"]) == (0, None, "compliant")
    text = felixscan("trend", "--db", db, "--days", "1", "--control",
                     "kube-controllers-metrics", "--cluster", "lean", "--format", "csv")
    (row,) = list(csv.DictReader(io.StringIO(text.stdout)))
    assert (row["control"], row["status"]) == ("kube-controllers-metrics", "error")


def test_trend_control_errors(db: str, tmp_path: Path) -> None:
    bad = felixscan("trend", "--db", db, "--control", "bird-metrics")
    assert bad.code == 2 and "invalid choice: 'bird-metrics'" in bad.stderr
    both = felixscan("trend", "--db", db, "--control", "typha-metrics", "--nodes")
    assert both.code == 2 and "cannot go with --control" in both.stderr
