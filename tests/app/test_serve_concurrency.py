"""`serve` scans several clusters at once, at most `serve.max_concurrent_scans`, and the probe
sockets of its runs share the process's budget with every other scan in it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import scanner.probe
import scanner.scan
from scanner.app.serve import ScanScheduler, ServeStore
from scanner.core.config import (
    ClusterSettings,
    ServeSettings,
    Settings,
    load_settings,
)
from scanner.core.evaluate import failed_cluster
from scanner.core.records import ClusterResult
from scanner.db.models import ClusterScan, ScanRun
from scanner.probe import ProbeSettings
from scanner.scan import ProbeSockets
from tests.helpers import scan_harness
from tests.helpers.scan_harness import Harness


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.48.0.0")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def _run_all(sched: ScanScheduler, names: list[str]) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    threads = [threading.Thread(target=lambda n=n: outcomes.__setitem__(n, sched.run_cluster(n)))
               for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return outcomes


@pytest.mark.parametrize("bound", [1, 2, 4])
def test_serve_scans_at_most_its_bound_at_once(sqlite_url: str, bound: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    inside = peak = 0
    barrier = threading.Barrier(bound, timeout=20)  # `bound` at once, or this times out

    def scan_cluster(cluster: ClusterSettings, **_kw: Any) -> ClusterResult:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        try:
            barrier.wait()
            time.sleep(0.05)
        finally:
            with lock:
                inside -= 1
        now = scanner.scan.utcnow()
        return failed_cluster(cluster.name, "unreachable on purpose", started_at=now,
                              finished_at=now)

    monkeypatch.setattr(scanner.scan, "scan_cluster", scan_cluster)
    names = [f"c{i}" for i in range(4)]
    settings = Settings(database=sqlite_url, schedule="0 2 * * *",
                        serve=ServeSettings(max_concurrent_scans=bound),
                        clusters=tuple(ClusterSettings(name=n) for n in names))
    store = ServeStore(sqlite_url)
    store.upgrade()
    try:
        outcomes = _run_all(ScanScheduler(settings, store), names)
        with store.sessions() as s:
            stored = sorted(s.scalars(select(ClusterScan.cluster)).all())
    finally:
        store.close()
    assert outcomes == dict.fromkeys(names, "scanned")
    assert peak == bound
    assert stored == names


def test_serve_runs_share_the_probe_socket_budget(h: Harness, sqlite_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["left", "right", "middle"]
    for name in names:
        h.cluster(name, ["closed", "felix-tls", "felix-http", "silent", "closed", "other"],
                  env={"FELIX_PROMETHEUSMETRICSENABLED": "true"})
    h.probe["concurrency"] = 6
    budget = ProbeSockets(8, floor=2)
    monkeypatch.setattr(scanner.scan, "probe_sockets", lambda: budget)
    lock = threading.Lock()
    in_use = peak = 0
    given: list[int] = []
    probe_nodes = scanner.probe.probe_nodes

    def spy(targets: Any, settings: ProbeSettings, **kw: Any) -> Any:
        nonlocal in_use, peak
        with lock:
            given.append(settings.concurrency)
            in_use += settings.concurrency
            peak = max(peak, in_use)
        try:
            time.sleep(0.1)
            return probe_nodes(targets, settings, **kw)
        finally:
            with lock:
                in_use -= settings.concurrency

    monkeypatch.setattr(scanner.scan, "probe_nodes", spy)
    settings = load_settings(h.config(), db_url=sqlite_url, environ={})
    settings = replace(settings, schedule="0 2 * * *",
                       serve=ServeSettings(max_concurrent_scans=3))
    store = ServeStore(sqlite_url)
    store.upgrade()
    try:
        outcomes = _run_all(ScanScheduler(settings, store), names)
        with store.sessions() as s:
            scans = dict(s.execute(select(ClusterScan.cluster, ClusterScan.status)).all())
            runs = s.scalars(select(ScanRun.status)).all()
    finally:
        store.close()
    assert outcomes == dict.fromkeys(names, "scanned")
    assert scans == dict.fromkeys(names, "non_compliant")  # Felix answers on two nodes each
    assert sorted(runs) == ["finished"] * 3
    assert peak <= budget.total and min(given) < 6  # three runs of 6 never held more than 8
    assert budget.free == budget.total
