"""Concurrency: two `felixscan scan` processes and a `felixscan serve` writing to one database.

The serve is the real `felixscan serve` process, with one change made by its launcher: its
cron triggers fire every 3 seconds instead of at most once a minute, so that within the test it
keeps scanning the same two clusters the two scanners scan. Scans of one cluster must take
turns (serve and `scan` share the per-cluster database lock), and every row must be there and
whole: each cluster scan with all its node rows, each finished run with all its clusters, the
day rollups and the node states pointing at the latest scans.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from scanner.db.models import (
    ClusterScan,
    DailyClusterSummary,
    Lease,
    NodeProbe,
    NodeState,
    ScanRun,
)
from scanner.db.store import Store
from tests.helpers import scan_harness
from tests.helpers.paths import ROOT
from tests.helpers.scan_harness import Harness, Node

TOKEN = "concurrency-token-0123456789"
RUNS = 3  # `felixscan scan` runs per scanner process
EVERY = 3  # seconds between the serve's scheduled runs of each cluster
NODES = {"a": 42, "b": 25}

# `felixscan serve` whose cron triggers fire every EVERY seconds (cron has minutes at best).
SERVE = f"""
import sys
from apscheduler.triggers.cron import CronTrigger
import scanner.app.serve
from scanner.app.cli import main

def every_few_seconds(expr, *, timezone, jitter=0):
    return CronTrigger(second="*/{EVERY}", timezone=timezone)

scanner.app.serve.cron_trigger = every_few_seconds
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.34.0.0")


class ServeProcess:
    def __init__(self, tmp: Path, config: Path, db: str) -> None:
        self.log = tmp / "serve.log"
        self._fh = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "-v", "serve", "--config", str(config), "--db", db,
             "--listen", "127.0.0.1:0"], cwd=ROOT,
            env={**os.environ, "FELIXSCAN_WEB_TOKEN": TOKEN}, stdout=self._fh,
            stderr=subprocess.STDOUT, text=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.text()}")
            assert time.monotonic() < deadline, f"no {needle!r} in:\n{self.text()}"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(40)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()



def rows(db: str) -> dict[str, list[Any]]:
    with Store(db) as store, store.sessions() as s:
        return {
            "runs": s.execute(select(ScanRun.id, ScanRun.status, ScanRun.trigger,
                                     ScanRun.cluster, ScanRun.note)).all(),
            "scans": s.execute(select(ClusterScan.id, ClusterScan.run_id, ClusterScan.cluster,
                                      ClusterScan.status, ClusterScan.started_at,
                                      ClusterScan.finished_at, ClusterScan.nodes_total,
                                      ClusterScan.nodes_fail)
                               .order_by(ClusterScan.id)).all(),
            "probes": s.execute(select(NodeProbe.cluster_scan_id, NodeProbe.node,
                                       NodeProbe.verdict)).all(),
            "daily": s.execute(select(DailyClusterSummary)).scalars().all(),
            "states": s.execute(select(NodeState)).scalars().all(),
            "leases": s.execute(select(Lease)).scalars().all(),
        }


@pytest.mark.slow
def test_two_scanners_and_a_serve_write_at_once(harness: Harness, db_url: str, tmp_path: Path,
                                                serves: list[ServeProcess]) -> None:
    harness.probe["timeout_seconds"] = 1
    a = harness.cluster("a", [Node("closed")] * (NODES["a"] - 2) + [Node("felix-http")] * 2)
    # Cluster a answers slowly, so b's scan ends first in each run and waits for a's:
    # time for another process to scan b meanwhile.
    a.emu.inject(r"daemonsets", delay=1.0)
    harness.cluster("b", [Node("closed")] * NODES["b"])
    config = harness.config()
    doc = yaml.safe_load(config.read_text())
    doc["schedule"] = "* * * * *"  # replaced by every EVERY seconds in the launcher
    doc["serve"] = {"misfire_grace_seconds": 60, "lock_ttl_seconds": 10,
                    "shutdown_grace_seconds": 30}
    config.write_text(yaml.safe_dump(doc))
    Store(db_url).upgrade()  # as `felixscan db upgrade` would, once

    serves.append(serve := ServeProcess(tmp_path, config, db_url))
    serve.wait_for("listening on http://")
    codes: list[list[int]] = [[], []]
    errors: list[str] = []

    def lane(i: int) -> None:
        for _ in range(RUNS):
            proc = subprocess.run(
                [sys.executable, "-m", "scanner", "scan", "--config", str(config), "--db",
                 db_url], capture_output=True, text=True, timeout=120, check=False)
            codes[i].append(proc.returncode)
            # Without a terminal, progress is logged (scanner.progress, INFO); nothing else.
            others = [line for line in proc.stderr.splitlines()
                      if " INFO scanner.progress: " not in line]
            if proc.returncode != 1 or others:
                errors.append(proc.stderr[-2000:])

    t0 = time.monotonic()
    lanes = [threading.Thread(target=lane, args=(i,)) for i in range(2)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    assert serve.stop() == 0
    wall = time.monotonic() - t0

    # --- every process did its part --------------------------------------------------------
    assert codes == [[1] * RUNS, [1] * RUNS], errors  # two Felix nodes are open, as planned
    assert errors == []
    got = rows(db_url)
    runs = {r.id: r for r in got["runs"]}
    scans = got["scans"]
    by_run: dict[int, list[Any]] = defaultdict(list)
    for cs in scans:
        by_run[cs.run_id].append(cs)
    statuses = Counter((r.trigger, r.status) for r in runs.values())
    assert set(statuses) <= {("cli", "finished"), ("schedule", "finished"),
                             ("schedule", "skipped")}, statuses  # none running or aborted
    assert statuses[("cli", "finished")] == 2 * RUNS
    scheduled = [r for r in runs.values() if r.trigger == "schedule" and r.status == "finished"]
    assert len({cs.cluster for r in scheduled for cs in by_run[r.id]}) == 2, (
        "the serve scanned neither or only one cluster")

    # --- every finished run has its clusters, every cluster scan all its nodes --------------
    for run in runs.values():
        clusters = sorted(cs.cluster for cs in by_run[run.id])
        if run.status == "skipped":
            assert clusters == [] and run.cluster in NODES and run.note
        elif run.trigger == "cli":
            assert clusters == ["a", "b"], run
        else:
            assert len(clusters) == 1, run  # a scheduled run scans its one cluster
    assert {cs.status for cs in scans} == {"non_compliant", "compliant"}  # no error, no "Locked"
    probes: Counter[int] = Counter(p.cluster_scan_id for p in got["probes"])
    for cs in scans:
        assert cs.nodes_total == NODES[cs.cluster] == probes[cs.id], cs
        assert cs.nodes_fail == (2 if cs.cluster == "a" else 0)
    assert len(got["probes"]) == sum(NODES[cs.cluster] for cs in scans)

    # --- no two scans of one cluster at the same time, and stored in the order made ---------
    for name in NODES:
        mine = [cs for cs in scans if cs.cluster == name]
        by_time = sorted(mine, key=lambda cs: cs.started_at)
        for before, after in itertools.pairwise(by_time):
            assert before.finished_at <= after.started_at, (name, before, after)
        assert [cs.id for cs in by_time] == [cs.id for cs in mine], (
            f"{name}: scans stored out of the order they were made")

    # --- the rollups agree with the scans ---------------------------------------------------
    per_day: dict[tuple[str, Any], list[Any]] = defaultdict(list)
    for cs in scans:
        per_day[(cs.cluster, cs.started_at.astimezone(UTC).date())].append(cs)
    assert {(d.cluster, d.day) for d in got["daily"]} == set(per_day)
    for d in got["daily"]:
        day_scans = per_day[(d.cluster, d.day)]
        last = max(day_scans, key=lambda cs: cs.started_at)
        assert d.scans == len(day_scans), d.cluster
        assert (d.last_cluster_scan_id, d.status, d.nodes, d.failing) == (
            last.id, last.status, last.nodes_total, last.nodes_fail), d.cluster
    latest = {name: max((cs for cs in scans if cs.cluster == name), key=lambda cs: cs.started_at)
              for name in NODES}
    verdicts = {(p.cluster_scan_id, p.node): p.verdict for p in got["probes"]}
    counts = Counter(cs.cluster for cs in scans)
    assert len(got["states"]) == sum(NODES.values())
    for st in got["states"]:
        assert st.last_cluster_scan_id == latest[st.cluster].id, (st.cluster, st.node)
        assert st.verdict == verdicts[(st.last_cluster_scan_id, st.node)]
        # Every scan gave each node the same verdict: the streak is every scan of the cluster.
        assert st.streak_scans == counts[st.cluster], (st.cluster, st.node)
    assert got["leases"] == []  # every lock released

    # --- what happened, for the record ------------------------------------------------------
    log = serve.text()
    for word in ("ERROR", "Traceback"):
        assert word not in log, log
    skipped = [r for r in runs.values() if r.status == "skipped"]
    print(f"\n{db_url.split(':', 1)[0]}: {wall:.1f} s; {len(scans)} cluster scans "
          f"({2 * 2 * RUNS} by the scanners, {len(scheduled)} by serve), "
          f"{len(got['probes'])} node rows, {len(skipped)} scheduled runs skipped "
          f"({Counter(r.note.split(' (')[0].split(':')[0] for r in skipped)}), "
          f"{log.count('already scanned')} found already scanned; 0 lost, 0 half-written")
