"""Several clusters in one run: `scan.max_concurrent_clusters` bounds them, the probe sockets of
all of them share the process's budget, and a concurrent run gives the results a sequential one
gives. A cluster that does not check felix-metrics has nothing of Felix evaluated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import scanner.probe
import scanner.scan
from scanner.core.calico import cluster_declared, resolve_nodes
from scanner.core.config import ClusterSettings, ScanSettings, Settings, load_settings
from scanner.core.errors import ClusterError
from scanner.core.evaluate import evaluate, with_controls
from scanner.core.records import FELIX, KUBE_CONTROLLERS, TYPHA, ClusterResult, ClusterSnapshot
from scanner.db.store import Store
from scanner.probe import ProbeSettings
from scanner.scan import ProbeSockets, run_scan
from tests.helpers import scan_harness
from tests.helpers.scan_harness import Harness


@pytest.fixture(autouse=True)
def _own_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_harness.own_addresses(monkeypatch, "127.47.0.0")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def _db(tmp_path: Path, name: str = "felixscan") -> str:
    return f"sqlite:///{tmp_path / f'{name}.db'}"


# --- the bound ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [1, 2, 3])
def test_run_scan_collects_at_most_the_bound_at_once(tmp_path: Path, bound: int) -> None:
    """With `bound` clusters per batch meeting at a barrier, the run must have `bound` at once
    (else the barrier times out), and never more (the peak)."""
    lock = threading.Lock()
    inside = peak = 0
    barrier = threading.Barrier(bound, timeout=20)

    def collector(cluster: ClusterSettings) -> ClusterSnapshot:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        try:
            barrier.wait()
            time.sleep(0.05)  # a cluster over the bound would be in here with them
        finally:
            with lock:
                inside -= 1
        raise ClusterError(f"{cluster.name}: collected")

    clusters = tuple(ClusterSettings(name=f"c{i}") for i in range(2 * bound))
    settings = Settings(database=_db(tmp_path), clusters=clusters,
                        scan=ScanSettings(max_concurrent_clusters=bound))
    with Store(settings.database) as store:
        outcome = run_scan(settings, store=store, collector=collector)
    assert peak == bound
    assert [c.cluster for c in outcome.clusters] == [c.name for c in clusters]
    assert all(c.status == "error" and c.error == f"{c.cluster}: collected"
               for c in outcome.clusters)
    assert sorted(outcome.stored) == sorted(c.name for c in clusters)


# --- the socket budget ------------------------------------------------------------------------


def test_budget_grants_what_is_asked_when_free() -> None:
    budget = ProbeSockets(100, floor=10)
    with budget.reserve(60) as a:
        assert a == 60 and budget.free == 40
        with budget.reserve(30) as b:
            assert b == 30 and budget.free == 10
        assert budget.free == 40
    assert budget.free == 100
    with budget.reserve(500) as c:  # never more than the whole budget
        assert c == 100


def test_budget_gives_a_smaller_share_above_the_floor() -> None:
    budget = ProbeSockets(100, floor=10)
    with budget.reserve(80), budget.reserve(50) as share:
        assert share == 20 and budget.free == 0
    assert budget.free == 100


def test_budget_below_the_floor_waits_for_a_release() -> None:
    budget = ProbeSockets(100, floor=10)
    got: list[int] = []
    holding = budget.reserve(95)
    assert holding.__enter__() == 95
    waiter = threading.Thread(target=lambda: got.append(_take(budget, 50)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and got == []  # 5 free: under the floor of 10
    holding.__exit__(None, None, None)
    waiter.join(10)
    assert got == [50] and budget.free == 100


def test_budget_of_a_small_want_is_not_held_back_by_the_floor() -> None:
    budget = ProbeSockets(100, floor=10)
    with budget.reserve(97), budget.reserve(3) as small:
        assert small == 3


def test_budget_needs_a_socket() -> None:
    with pytest.raises(ValueError, match="at least one socket"):
        ProbeSockets(0)


def _take(budget: ProbeSockets, want: int) -> int:
    with budget.reserve(want) as granted:
        return granted


def test_process_budget_follows_the_open_files_limit() -> None:
    from scanner.probe import raise_nofile_limit

    budget = scanner.scan.probe_sockets()
    assert budget is scanner.scan.probe_sockets()  # one per process
    limit = raise_nofile_limit()
    assert limit // 2 <= budget.total < limit


# --- concurrent clusters, end to end --------------------------------------------------------


KINDS = ["closed", "felix-tls", "felix-http", "closed", "other", "silent"]


def _fleet(h: Harness, names: list[str]) -> None:
    for n, name in enumerate(names):
        h.cluster(name, KINDS[n % 3:] + KINDS[:n % 3],
                  env={"FELIX_PROMETHEUSMETRICSENABLED": "true"} if n % 2 else None)


def _view(result: ClusterResult) -> dict[str, Any]:
    return {"status": result.status, "error": result.error,
            "nodes": [(n.node, n.verdict, [(p.address, p.port, p.state, p.protocol, p.felix)
                                           for p in n.probes]) for n in result.nodes],
            "findings": sorted((f.id, f.node or "", f.control) for f in result.findings),
            "controls": [(c.control, c.status) for c in result.controls]}


def test_concurrent_run_within_a_small_budget_matches_a_sequential_run(
        h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["east", "west", "north", "south"]
    _fleet(h, names)
    h.probe["concurrency"] = 8
    budget = ProbeSockets(12, floor=2)
    monkeypatch.setattr(scanner.scan, "probe_sockets", lambda: budget)
    lock = threading.Lock()
    given: list[int] = []
    in_use = peak = 0
    probe_nodes = scanner.probe.probe_nodes

    def spy(targets: Any, settings: ProbeSettings, **kw: Any) -> Any:
        nonlocal in_use, peak
        with lock:
            given.append(settings.concurrency)
            in_use += settings.concurrency
            peak = max(peak, in_use)
        try:
            time.sleep(0.1)  # long enough for the other clusters to ask for their share
            return probe_nodes(targets, settings, **kw)
        finally:
            with lock:
                in_use -= settings.concurrency

    monkeypatch.setattr(scanner.scan, "probe_nodes", spy)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for bound in (1, 4):
        settings = load_settings(h.config(), db_url=_db(tmp_path, f"bound{bound}"), environ={})
        settings = replace(settings, scan=ScanSettings(max_concurrent_clusters=bound))
        with Store(settings.database) as store:
            outcome = run_scan(settings, store=store)
        assert sorted(outcome.stored) == sorted(names)
        results[bound] = {r.cluster: _view(r) for r in outcome.clusters}
    assert results[4] == results[1]
    assert {v["status"] for v in results[1].values()} == {"non_compliant"}
    assert peak <= budget.total  # four clusters of 8 each never held more than the 12
    assert all(1 <= g <= 8 for g in given) and min(given) < 8  # some got a smaller share
    assert budget.free == budget.total


# --- felix-metrics not checked ----------------------------------------------------------------


def test_without_felix_control_felix_is_not_evaluated_and_the_result_is_unchanged(
        h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h.cluster("quiet", ["closed", "felix-tls"], env={"FELIX_PROMETHEUSMETRICSENABLED": "true"})
    h.typha("quiet", env={"TYPHA_PROMETHEUSMETRICSENABLED": "true"})
    h.kube_controllers("quiet")
    h.cluster_options["quiet"] = {"controls": [TYPHA, KUBE_CONTROLLERS]}
    probed: list[str] = []
    probe_nodes = scanner.probe.probe_nodes

    def spy(targets: Any, settings: ProbeSettings, **kw: Any) -> Any:
        probed.append(settings.metric_prefix)
        return probe_nodes(targets, settings, **kw)

    def no_felix(*_a: object, **_kw: object) -> ClusterResult:
        raise AssertionError("Felix evaluated although felix-metrics is not checked")

    monkeypatch.setattr(scanner.scan, "probe_nodes", spy)
    monkeypatch.setattr(scanner.scan, "evaluate", no_felix)
    monkeypatch.setattr(scanner.scan, "resolve_nodes", no_felix)
    outcome = h.run_scan(_db(tmp_path))
    (result,) = outcome.clusters
    assert "felix_" not in probed and len(probed) == 2  # typha_ and kube-controllers' only
    assert [c.control for c in result.controls] == [TYPHA, KUBE_CONTROLLERS]
    assert result.status == "non_compliant" and result.nodes == () and result.declared is None
    assert result.install == "manifest" and result.snapshot is not None
    # What evaluating Felix and dropping it gave (the earlier way), field by field.
    snapshot = result.snapshot
    declared = resolve_nodes(snapshot)
    felix = evaluate(snapshot, declared, [], cluster_declared=cluster_declared(
        snapshot, declared), started_at=result.started_at, finished_at=result.finished_at)
    others = {c.control: c for c in result.controls}
    expected = with_controls(felix, snapshot, (TYPHA, KUBE_CONTROLLERS), others)
    for name in ("cluster", "status", "install", "declared", "nodes", "findings", "error",
                 "controls", "snapshot"):
        assert getattr(result, name) == getattr(expected, name), name
    assert FELIX not in {f.control for f in result.findings}
