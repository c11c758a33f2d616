"""The control catalogue in the database, on SQLite and PostgreSQL: one control_scans row per
control checked, Typha's and kube-controllers' targets beside Felix's nodes in node_probes,
per-control rollups, views and queries; revision 0008 on a database with older rows.

Results are built by hand here (three controls, targets on named nodes and pods) and every
expected figure is counted from them, not from the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import DateTime, TextClause, bindparam, func, inspect, select, text

from reports.integrity import canonical_json, report_data
from scanner.core.evaluate import failed_cluster
from scanner.core.records import (
    CONTROL_IDS,
    FELIX,
    KUBE_CONTROLLERS,
    TYPHA,
    ClusterResult,
    ClusterSnapshot,
    ClusterStatus,
    ComponentPod,
    ComponentSnapshot,
    ConfigFile,
    ControlResult,
    Declared,
    Finding,
    KubeControllersConfig,
    Node,
    NodeResult,
    ProbeResult,
    Rollout,
    Verdict,
)
from scanner.db.models import (
    ClusterScan,
    ControlScan,
    DailyClusterSummary,
    DailyControlSummary,
    FindingRow,
    NodeProbe,
    NodeState,
)
from scanner.db.queries.history import load_report
from scanner.db.queries.metrics import cluster_states
from scanner.db.queries.pages import cluster_page, fleet_overview
from scanner.db.queries.retention import prune
from scanner.db.queries.trends import failing_streaks, trend
from scanner.db.store import Store, alembic_config, snapshot_summary

TODAY = date(2026, 12, 1)
MORNING = datetime(2026, 12, 1, 2, tzinfo=UTC)
NOON = datetime(2026, 12, 1, 12, tzinfo=UTC)
YESTERDAY = MORNING - timedelta(days=1)
STATUS_ORDER = {"non_compliant": 0, "error": 1, "compliant": 2}


def declared(port: int, *, enabled: bool = False, pod: str | None = None,
             source: str = "built-in default (false)") -> Declared:
    return Declared(enabled=enabled, source=source, port=port, port_source="built-in default",
                    pod=pod)


def target(node: str, address: str, port: int, verdict: Verdict, *,
           pod: str | None = None, enabled: bool = False) -> NodeResult:
    state = "open" if verdict == "fail" else "error" if verdict == "unknown" else "closed"
    return NodeResult(node=node, address=address, port=port,
                      declared=declared(port, enabled=enabled, pod=pod),
                      probe=ProbeResult(node=node, address=address, port=port, state=state),
                      pod_current=True, verdict=verdict)


def status_of(targets: tuple[NodeResult, ...]) -> ClusterStatus:
    verdicts = {t.verdict for t in targets}
    return ("non_compliant" if "fail" in verdicts else
            "error" if "unknown" in verdicts else "compliant")


def snapshot(cluster: str, nodes: dict[str, bool | None]) -> ClusterSnapshot:
    rollout = Rollout(generation=1, observed_generation=1, desired=len(nodes),
                      updated=len(nodes), ready=len(nodes), available=len(nodes),
                      current_revision="abc", strategy="RollingUpdate", max_unavailable="1")
    typha = ComponentSnapshot(
        control=TYPHA, namespace="calico-system", deployment="calico-typha",
        container="calico-typha", found=True, image="calico/typha:v3.32.1",
        pods=(ComponentPod(name="typha-a", node="n0", pod_ip="10.0.0.1", host_network=True,
                           phase="Running", ready=True),
              ComponentPod(name="typha-b", node="n1", pod_ip="10.0.0.2", host_network=True,
                           phase="Running", ready=False)),
        replicas=2, ready_replicas=1)
    kcc = ComponentSnapshot(
        control=KUBE_CONTROLLERS, namespace="calico-system",
        deployment="calico-kube-controllers", container="calico-kube-controllers", found=True,
        pods=(ComponentPod(name="kcc-x", node="n2", pod_ip="192.168.9.9", host_network=False,
                           phase="Running", ready=True),),
        replicas=1, ready_replicas=1, kcc=KubeControllersConfig(exists=True, port=9094))
    return ClusterSnapshot(
        cluster=cluster, install="operator", namespace="calico-system", daemonset="calico-node",
        container="calico-node", image="calico/node:v3.32.1", env=(),
        config_file=ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=(), felix_crd=True, installation=None, rollout=rollout, pods=(),
        nodes=tuple(Node(n, (("InternalIP", "10.0.0.1"),), ready) for n, ready in nodes.items()),
        collected_at=MORNING, controls=CONTROL_IDS,
        components={TYPHA: typha, KUBE_CONTROLLERS: kcc})


def three_controls(cluster: str, when: datetime, *, felix: dict[str, Verdict] | None = None,
                   typha: tuple[Verdict, Verdict] = ("fail", "pass"),
                   kcc: Verdict = "pass", with_snapshot: bool = True) -> ClusterResult:
    """A cluster checking all three controls: Felix on n0..n2, Typha's two pods on n0 and n1
    (host network: node addresses), kube-controllers' pod on n2 (its pod IP)."""
    felix = felix if felix is not None else {"n0": "pass", "n1": "pass", "n2": "fail"}
    nodes = tuple(target(n, f"10.0.0.{i + 1}", 9091, v, pod=f"calico-node-{n}")
                  for i, (n, v) in enumerate(felix.items()))
    typha_targets = (target("n0", "10.0.0.1", 9093, typha[0], pod="typha-a", enabled=True),
                     target("n1", "10.0.0.2", 9093, typha[1], pod="typha-b"))
    kcc_targets = (target("n2", "192.168.9.9", 9094, kcc, pod="kcc-x"),)
    felix_findings = tuple(Finding(id="FELIX-PORT-REACHABLE", severity="critical", message="m",
                                   node=n) for n, v in felix.items() if v == "fail")
    typha_findings = tuple(Finding(id="TYPHA-PORT-REACHABLE", severity="critical", message="t",
                                   node=t.node, control=TYPHA)
                           for t in typha_targets if t.verdict == "fail")
    kcc_findings = tuple(Finding(id="KCC-PORT-REACHABLE", severity="critical", message="k",
                                 node=t.node, control=KUBE_CONTROLLERS)
                         for t in kcc_targets if t.verdict == "fail")
    felix_declared = declared(9091)
    controls = (
        ControlResult(control=FELIX, status=status_of(nodes), declared=felix_declared,
                      targets=nodes, findings=felix_findings, namespace="calico-system",
                      workload="calico-node", image="calico/node:v3.32.1"),
        ControlResult(control=TYPHA, status=status_of(typha_targets),
                      declared=declared(9093, enabled=True,
                                        source="env TYPHA_PROMETHEUSMETRICSENABLED"),
                      targets=typha_targets, findings=typha_findings,
                      namespace="calico-system", workload="calico-typha",
                      image="calico/typha:v3.32.1"),
        ControlResult(control=KUBE_CONTROLLERS, status=status_of(kcc_targets),
                      declared=declared(9094, source="KubeControllersConfiguration default"),
                      targets=kcc_targets, findings=kcc_findings, namespace="calico-system",
                      workload="calico-kube-controllers"),
    )
    statuses = [c.status for c in controls]
    overall = min(statuses, key=lambda s: STATUS_ORDER[s])
    return ClusterResult(
        cluster=cluster, status=overall, install="operator", declared=felix_declared,
        nodes=nodes, findings=felix_findings + typha_findings + kcc_findings, error=None,
        started_at=when, finished_at=when,
        snapshot=snapshot(cluster, {"n0": True, "n1": False, "n2": None})
        if with_snapshot else None,
        controls=controls)


def felix_only(cluster: str, when: datetime, verdicts: dict[str, Verdict]) -> ClusterResult:
    """A result as older callers make it: no `controls`, Felix's fields alone."""
    nodes = tuple(target(n, "10.0.0.1", 9091, v) for n, v in verdicts.items())
    return ClusterResult(cluster=cluster, status=status_of(nodes), install="manifest",
                         declared=declared(9091), nodes=nodes, findings=(), error=None,
                         started_at=when, finished_at=when, snapshot=None)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store(db_url) as s:
        s.upgrade()
        yield s


def save(store: Store, result: ClusterResult) -> int:
    run = store.begin_run(trigger="test", started_at=result.started_at)
    cid = store.save_cluster(run, result)
    store.finish_run(run, finished_at=result.finished_at)
    return cid


# --- writing -------------------------------------------------------------------------------


def test_three_controls_are_stored_in_one_cluster_scan(store: Store) -> None:
    result = three_controls("c", MORNING)
    cid = save(store, result)
    with store.sessions() as s:
        scan = s.get(ClusterScan, cid)
        assert scan is not None
        # The cluster scan stays Felix's, its status the worst of the controls'.
        assert (scan.status, scan.nodes_total, scan.nodes_pass, scan.nodes_fail) == \
            ("non_compliant", 3, 2, 1)
        rows = {c.control: c for c in s.scalars(select(ControlScan)
                                                .where(ControlScan.cluster_scan_id == cid))}
        assert set(rows) == set(CONTROL_IDS)
        typha = rows[TYPHA]
        assert (typha.status, typha.installed, typha.declared_enabled, typha.declared_port,
                typha.declared_source, typha.targets_total, typha.targets_pass,
                typha.targets_fail, typha.targets_unknown, typha.targets_waived,
                typha.namespace, typha.workload, typha.image) == \
            ("non_compliant", True, True, 9093, "env TYPHA_PROMETHEUSMETRICSENABLED", 2, 1, 1,
             0, 0, "calico-system", "calico-typha", "calico/typha:v3.32.1")
        assert (rows[KUBE_CONTROLLERS].status, rows[KUBE_CONTROLLERS].targets_total,
                rows[KUBE_CONTROLLERS].declared_port) == ("compliant", 1, 9094)
        assert (rows[FELIX].targets_total, rows[FELIX].targets_fail,
                rows[FELIX].workload) == (3, 1, "calico-node")

        probes = s.execute(select(NodeProbe.control, NodeProbe.node, NodeProbe.pod,
                                  NodeProbe.port, NodeProbe.address, NodeProbe.verdict,
                                  NodeProbe.node_ready)
                           .where(NodeProbe.cluster_scan_id == cid)).all()
        assert sorted(tuple(p) for p in probes) == sorted([
            (FELIX, "n0", "calico-node-n0", 9091, "10.0.0.1", "pass", True),
            (FELIX, "n1", "calico-node-n1", 9091, "10.0.0.2", "pass", False),
            (FELIX, "n2", "calico-node-n2", 9091, "10.0.0.3", "fail", None),
            (KUBE_CONTROLLERS, "n2", "kcc-x", 9094, "192.168.9.9", "pass", None),
            (TYPHA, "n0", "typha-a", 9093, "10.0.0.1", "fail", True),
            (TYPHA, "n1", "typha-b", 9093, "10.0.0.2", "pass", False),
        ])
        findings = s.execute(select(FindingRow.finding_id, FindingRow.control, FindingRow.node)
                             .where(FindingRow.cluster_scan_id == cid)).all()
        assert sorted(tuple(f) for f in findings) == [
            ("FELIX-PORT-REACHABLE", FELIX, "n2"), ("TYPHA-PORT-REACHABLE", TYPHA, "n0")]

        # Rollups: the cluster's as before (overall status, Felix's nodes); one per control.
        day = s.get(DailyClusterSummary, ("c", TODAY))
        assert day is not None
        assert (day.status, day.nodes, day.passing, day.failing) == ("non_compliant", 3, 2, 1)
        per_control = {r.control: (r.status, r.targets, r.passing, r.failing, r.unknown, r.scans)
                       for r in s.scalars(select(DailyControlSummary))}
        assert per_control == {FELIX: ("non_compliant", 3, 2, 1, 0, 1),
                               TYPHA: ("non_compliant", 2, 1, 1, 0, 1),
                               KUBE_CONTROLLERS: ("compliant", 1, 1, 0, 0, 1)}
        # Node states are Felix's nodes only: Typha's failing n0 does not make n0 fail.
        states = {n.node: n.verdict for n in s.scalars(select(NodeState))}
        assert states == {"n0": "pass", "n1": "pass", "n2": "fail"}
    assert [(s.node, s.verdict) for s in failing_streaks(store)] == [("n2", "fail")]


def test_a_result_without_controls_is_felix_alone(store: Store) -> None:
    cid = save(store, felix_only("old-caller", MORNING, {"a": "pass", "b": "fail"}))
    with store.sessions() as s:
        [row] = s.scalars(select(ControlScan).where(ControlScan.cluster_scan_id == cid))
        assert (row.control, row.status, row.targets_total, row.targets_fail, row.installed) == \
            (FELIX, "non_compliant", 2, 1, True)
        assert set(s.scalars(select(NodeProbe.control))) == {FELIX}
        [day] = s.scalars(select(DailyControlSummary))
        assert (day.control, day.targets, day.failing) == (FELIX, 2, 1)


def test_a_failed_scan_records_every_control_as_an_error(store: Store) -> None:
    cid = save(store, failed_cluster("down", "API down", started_at=MORNING,
                                     finished_at=MORNING, controls=CONTROL_IDS))
    with store.sessions() as s:
        rows = s.execute(select(ControlScan.control, ControlScan.status, ControlScan.error,
                                ControlScan.targets_total)
                         .where(ControlScan.cluster_scan_id == cid)).all()
        assert sorted(tuple(r) for r in rows) == sorted(
            (c, "error", "API down", 0) for c in CONTROL_IDS)
        assert sorted(s.scalars(select(FindingRow.control))) == sorted(CONTROL_IDS)
    [state] = cluster_states(store)
    assert state.controls == dict.fromkeys(CONTROL_IDS, "error")


def test_components_are_summarised_with_the_snapshot(store: Store) -> None:
    result = three_controls("c", MORNING)
    summary = snapshot_summary(result)
    comps = summary["components"]
    assert set(comps) == {TYPHA, KUBE_CONTROLLERS}
    assert comps[TYPHA]["deployment"] == "calico-typha"
    assert comps[TYPHA]["replicas"] == 2
    assert [(p["name"], p["node"], p["ip"]) for p in comps[TYPHA]["pods"]] == [
        ("typha-a", "n0", "10.0.0.1"), ("typha-b", "n1", "10.0.0.2")]
    assert comps[KUBE_CONTROLLERS]["kcc"]["port"] == 9094
    json.dumps(summary)  # all of it JSON
    cid = save(store, result)
    with store.sessions() as s:
        scan = s.get(ClusterScan, cid)
        assert scan is not None
        assert scan.snapshot["components"][KUBE_CONTROLLERS]["found"] is True
    bare = replace(result, snapshot=replace(snapshot("c", {}), components={}))
    assert "components" not in snapshot_summary(bare)


# --- rollups, views, trends ----------------------------------------------------------------


def test_the_days_last_scan_decides_each_controls_figures(store: Store) -> None:
    save(store, three_controls("c", YESTERDAY, typha=("pass", "pass")))
    save(store, three_controls("c", NOON, typha=("fail", "fail"), kcc="unknown"))
    save(store, three_controls("c", MORNING, typha=("pass", "pass")))  # stored late
    with store.sessions() as s:
        rows = {(r.control, r.day): (r.scans, r.status, r.targets, r.failing, r.unknown)
                for r in s.scalars(select(DailyControlSummary))}
    assert rows[(TYPHA, TODAY)] == (2, "non_compliant", 2, 2, 0)
    assert rows[(KUBE_CONTROLLERS, TODAY)] == (2, "error", 1, 0, 1)
    assert rows[(TYPHA, TODAY - timedelta(days=1))] == (1, "compliant", 2, 0, 0)
    assert rows[(FELIX, TODAY)] == (2, "non_compliant", 3, 1, 0)

    points = trend(store, days=2, today=TODAY, control=TYPHA)
    assert [(p.day, p.nodes, p.failing, p.status, p.control) for p in points] == [
        (TODAY - timedelta(days=1), 2, 0, "compliant", TYPHA),
        (TODAY, 2, 2, "non_compliant", TYPHA)]
    assert points[-1].as_dict() == {"cluster": "c", "day": "2026-12-01", "nodes": 2,
                                    "failing": 2, "unknown": 0, "ratio": 0.0,
                                    "status": "non_compliant", "scans": 2, "waived": 0,
                                    "control": TYPHA}
    # Without a control: the cluster as a whole, exactly as before.
    whole = trend(store, days=2, today=TODAY)
    assert [(p.nodes, p.failing, p.control) for p in whole] == [(3, 1, None), (3, 1, None)]
    assert "control" not in whole[0].as_dict()
    kcc = trend(store, days=1, today=TODAY, control=KUBE_CONTROLLERS)
    assert [(p.nodes, p.unknown, p.ratio, p.status) for p in kcc] == [(1, 1, 0.0, "error")]
    assert trend(store, days=2, today=TODAY, control=TYPHA, clusters=["other"]) == []


def test_control_views(store: Store) -> None:
    save(store, three_controls("c", YESTERDAY, typha=("pass", "pass")))
    cid = save(store, three_controls("c", MORNING, typha=("fail", "pass")))
    save(store, felix_only("old", MORNING, {"a": "pass"}))
    with store.engine.connect() as conn:
        daily = {(r.cluster, r.control, str(r.day)): (r.scans, r.status, r.targets, r.passing,
                                                       r.failing, r.unknown, r.ratio)
                 for r in conn.execute(text("SELECT * FROM daily_control_compliance"))}
        assert daily[("c", TYPHA, "2026-12-01")] == (1, "non_compliant", 2, 1, 1, 0, 0.5)
        assert daily[("c", TYPHA, "2026-11-30")] == (1, "compliant", 2, 2, 0, 0, 1.0)
        assert daily[("old", FELIX, "2026-12-01")] == (1, "compliant", 1, 1, 0, 0, 1.0)
        assert len(daily) == 7
        latest = {(r.cluster, r.control): r for r in conn.execute(text(
            "SELECT * FROM latest_control_status"))}
        assert set(latest) == {("c", c) for c in CONTROL_IDS} | {("old", FELIX)}
        typha = latest[("c", TYPHA)]
        assert (typha.cluster_scan_id, typha.status, typha.targets_total, typha.targets_fail,
                bool(typha.installed), bool(typha.declared_enabled), typha.declared_port) == \
            (cid, "non_compliant", 2, 1, True, True, 9093)
        # The views of before still answer, with Felix's figures.
        assert dict(conn.execute(text("SELECT cluster, nodes_total FROM latest_cluster_status"))
                    .all()) == {"c": 3, "old": 1}
        assert {(r[0], r[1]) for r in conn.execute(text(
            "SELECT cluster, node FROM node_failure_streaks"))} == {("c", "n2")}


# --- reading: reports, pages, metrics ------------------------------------------------------


def test_report_controls_and_felix_nodes_apart(store: Store) -> None:
    # Typha fails on n0 and n1, which pass for Felix: Felix's tables must not show them.
    save(store, three_controls("c", YESTERDAY, felix={"n0": "pass", "n1": "pass", "n2": "pass"},
                               typha=("pass", "pass")))
    save(store, three_controls("c", MORNING, felix={"n0": "pass", "n1": "pass", "n2": "fail"},
                               typha=("fail", "fail")))
    report = load_report(store, since=TODAY - timedelta(days=1), until=TODAY,
                         now=NOON)
    [c] = report.clusters
    assert [(n.name, n.verdict, n.port) for n in c.nodes] == [
        ("n2", "fail", 9091), ("n0", "pass", 9091), ("n1", "pass", 9091)]
    assert c.changes is not None
    assert [(ch.node, ch.before, ch.after) for ch in c.changes.regressed] == [
        ("n2", "pass", "fail")]
    assert not c.changes.new and not c.changes.removed
    assert c.failing_anywhere == ("n2",)
    assert [v.failing for v in c.vantages] == [("n2",)]

    assert [e.control for e in c.controls] == list(CONTROL_IDS)
    felix, typha, kcc = c.controls
    assert felix.targets == () and (felix.targets_total, felix.targets_fail) == (3, 1)
    assert (typha.status, typha.targets_total, typha.targets_fail, typha.workload) == \
        ("non_compliant", 2, 2, "calico-typha")
    assert [(t.name, t.pod, t.port, t.verdict) for t in typha.targets] == [
        ("n0", "typha-a", 9093, "fail"), ("n1", "typha-b", 9093, "fail")]
    assert [(t.name, t.pod, t.address) for t in kcc.targets] == [("n2", "kcc-x", "192.168.9.9")]
    assert c.control(TYPHA) == typha
    assert {f.control for f in c.findings} == {FELIX, TYPHA}
    assert [(f.id, f.node, f.control) for f in c.findings if f.control == TYPHA] == [
        ("TYPHA-PORT-REACHABLE", "n0", TYPHA), ("TYPHA-PORT-REACHABLE", "n1", TYPHA)]

    trend_by_control = c.control_trend
    assert list(trend_by_control) == list(CONTROL_IDS)
    assert [(p.day, p.status, p.targets, p.failing, p.unknown)
            for p in trend_by_control[TYPHA]] == [
        (TODAY - timedelta(days=1), "compliant", 2, 0, 0),
        (TODAY, "non_compliant", 2, 2, 0)]
    assert [p.failing for p in trend_by_control[FELIX]] == [p.failing for p in c.series]
    # What a report embeds reads back to the same data (report verify renders from it).
    assert report_data(canonical_json(report)) == report


def test_pages_and_metrics_show_each_controls_status(store: Store) -> None:
    save(store, three_controls("c", MORNING, felix={"n0": "pass", "n1": "fail", "n2": "pass"},
                               typha=("fail", "pass")))
    save(store, felix_only("old", MORNING, {"a": "pass"}))
    overview = {o.name: o for o in fleet_overview(store, since=TODAY, configured=["never"])}
    assert overview["c"].controls == {FELIX: "non_compliant", TYPHA: "non_compliant",
                                      KUBE_CONTROLLERS: "compliant"}
    assert list(overview["c"].controls) == list(CONTROL_IDS)
    assert overview["c"].latest is not None
    assert overview["c"].latest.controls == overview["c"].controls
    assert overview["old"].controls == {FELIX: "compliant"}
    assert overview["never"].controls == {} and overview["never"].latest is None

    page = cluster_page(store, "c", since=TODAY)
    assert page is not None
    # Felix's failing n1 only: Typha's failing target on n0 is not a Felix node issue, and
    # n1's Typha row (passing) does not double it.
    assert [(i.node, i.verdict, i.port) for i in page.issues] == [("n1", "fail", 9091)]
    assert page.issues_total == 1
    assert [c.control for c in page.controls] == list(CONTROL_IDS)
    assert [(t.name, t.pod, t.verdict) for t in page.controls[1].targets] == [
        ("n0", "typha-a", "fail"), ("n1", "typha-b", "pass")]
    assert page.controls[0].targets == ()
    assert {(f.id, f.control) for f in page.findings} == {
        ("FELIX-PORT-REACHABLE", FELIX), ("TYPHA-PORT-REACHABLE", TYPHA)}

    states = {s.cluster: s for s in cluster_states(store)}
    assert states["c"].controls == overview["c"].controls
    assert (states["c"].nodes, states["c"].failing) == (3, 1)
    assert states["old"].controls == {FELIX: "compliant"}


def test_pruning_removes_every_controls_probes(store: Store) -> None:
    old = datetime(2026, 10, 1, 2, tzinfo=UTC)
    cid = save(store, three_controls("c", old))
    save(store, three_controls("c", MORNING))
    result = prune(store, keep_days=30, now=NOON)
    assert (result.scans, result.probes, result.findings) == (1, 6, 2)
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(NodeProbe)
                        .where(NodeProbe.cluster_scan_id == cid)) == 0
        # The control results stay, as the cluster scan does.
        assert s.scalar(select(func.count()).select_from(ControlScan)
                        .where(ControlScan.cluster_scan_id == cid)) == 3


# --- migration -----------------------------------------------------------------------------


def _sql(statement: str) -> TextClause:
    """A statement whose :t is a timestamp, stored as SQLAlchemy stores one (on SQLite: text
    with microseconds, which the readers compare as text)."""
    return text(statement).bindparams(bindparam("t", type_=DateTime(timezone=True)))


def _write_0007_rows(store: Store) -> dict[str, int]:
    """Two scans of one cluster as felixscan wrote them at revision 0007, by hand."""
    ids: dict[str, int] = {}
    with store.engine.begin() as conn:
        run = conn.execute(_sql(
            "INSERT INTO scan_runs (started_at, status, trigger, tool_version, scanner_host,"
            " vantage) VALUES (:t, 'finished', 'cli', 'old', 'h', 'corp') RETURNING id"),
            {"t": datetime(2026, 11, 29, 2)}).scalar_one()
        for day, verdict, status in ((29, "pass", "compliant"), (30, "fail", "non_compliant")):
            when = datetime(2026, 11, day, 2)
            cs = conn.execute(_sql(
                "INSERT INTO cluster_scans (run_id, cluster, started_at, finished_at, status,"
                " install, declared_enabled, declared_source, declared_port, declared_host,"
                " nodes_total, nodes_pass, nodes_fail, nodes_unknown, nodes_waived, namespace,"
                " daemonset, image, snapshot, timings) VALUES (:r, 'legacy', :t, :t, :s,"
                " 'manifest', false, 'default (false)', 9091, '', 2, :p, :f, 0, 0,"
                " 'kube-system', 'calico-node', 'calico/node:v3.30.7', '{}', '{}')"
                " RETURNING id"),
                {"r": run, "t": when, "s": status, "p": 2 if verdict == "pass" else 1,
                 "f": 0 if verdict == "pass" else 1}).scalar_one()
            ids[f"scan{day}"] = cs
            for node, v in (("w1", "pass"), ("w2", verdict)):
                conn.execute(text(
                    "INSERT INTO node_probes (cluster_scan_id, node, address, port, state,"
                    " verdict) VALUES (:c, :n, '10.1.1.1', 9091, :st, :v)"),
                    {"c": cs, "n": node, "st": "open" if v == "fail" else "closed", "v": v})
            if verdict == "fail":
                conn.execute(text(
                    "INSERT INTO findings (cluster_scan_id, finding_id, severity, node, message,"
                    " evidence, remediation) VALUES (:c, 'FELIX-PORT-REACHABLE', 'critical',"
                    " 'w2', 'served', '{}', 'fix')"), {"c": cs})
            conn.execute(_sql(
                "INSERT INTO daily_cluster_summary (cluster, day, scans, last_cluster_scan_id,"
                " last_started_at, status, nodes, passing, failing, unknown, waived) VALUES"
                " ('legacy', :d, 1, :c, :t, :s, 2, :p, :f, 0, 0)"),
                {"d": when.date(), "c": cs, "t": when, "s": status,
                 "p": 2 if verdict == "pass" else 1, "f": 0 if verdict == "pass" else 1})
    return ids


def test_upgrade_from_0007_makes_old_rows_felix_metrics(db_url: str) -> None:
    with Store(db_url) as store:
        command.upgrade(alembic_config(db_url), "0007")
        ids = _write_0007_rows(store)
        store.upgrade()
        assert store.current() == "0008"
        with store.sessions() as s:
            rows = s.execute(select(
                ControlScan.cluster_scan_id, ControlScan.control, ControlScan.status,
                ControlScan.installed, ControlScan.declared_enabled, ControlScan.declared_source,
                ControlScan.declared_port, ControlScan.declared_host, ControlScan.targets_total,
                ControlScan.targets_pass, ControlScan.targets_fail, ControlScan.targets_waived,
                ControlScan.namespace, ControlScan.workload, ControlScan.image)
                .order_by(ControlScan.cluster_scan_id)).all()
            assert [tuple(r) for r in rows] == [
                (ids["scan29"], FELIX, "compliant", True, False, "default (false)", 9091, "", 2,
                 2, 0, 0, "kube-system", "calico-node", "calico/node:v3.30.7"),
                (ids["scan30"], FELIX, "non_compliant", True, False, "default (false)", 9091,
                 "", 2, 1, 1, 0, "kube-system", "calico-node", "calico/node:v3.30.7")]
            assert set(s.scalars(select(NodeProbe.control))) == {FELIX}
            assert set(s.scalars(select(FindingRow.control))) == {FELIX}
            assert s.scalar(select(func.count()).select_from(NodeProbe)
                            .where(NodeProbe.pod.is_not(None))) == 0
            days = {(r.control, r.day): (r.scans, r.last_cluster_scan_id, r.status, r.targets,
                                         r.passing, r.failing)
                    for r in s.scalars(select(DailyControlSummary))}
            assert days == {(FELIX, date(2026, 11, 29)): (1, ids["scan29"], "compliant", 2, 2, 0),
                            (FELIX, date(2026, 11, 30)): (1, ids["scan30"], "non_compliant", 2,
                                                          1, 1)}
        # Old rows read as they did, now as felix-metrics.
        report = load_report(store, now=NOON, until=TODAY)
        [c] = report.clusters
        assert [e.control for e in c.controls] == [FELIX]
        assert (c.controls[0].status, c.controls[0].targets_fail) == ("non_compliant", 1)
        assert [(n.name, n.verdict) for n in c.nodes] == [("w2", "fail"), ("w1", "pass")]
        assert [(f.id, f.control) for f in c.findings] == [("FELIX-PORT-REACHABLE", FELIX)]
        assert [p.failing for p in c.control_trend[FELIX]] == [p.failing for p in c.series]
        assert c.changes is not None
        assert [ch.node for ch in c.changes.regressed] == ["w2"]
        assert trend(store, days=3, today=TODAY, control=FELIX) == [
            replace(p, control=FELIX) for p in trend(store, days=3, today=TODAY)]
        [o] = fleet_overview(store, since=TODAY)
        assert o.controls == {FELIX: "non_compliant"}
        # A new scan after the upgrade writes beside the old ones.
        save(store, three_controls("legacy", MORNING))
        [c] = load_report(store, now=NOON, until=TODAY).clusters
        assert [e.control for e in c.controls] == list(CONTROL_IDS)
        assert [(ch.node, ch.before, ch.after) for ch in c.changes.removed] == \
            [("w1", "pass", None), ("w2", "fail", None)]  # type: ignore[union-attr]


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        cid = save(store, three_controls("c", MORNING))
        command.downgrade(alembic_config(db_url), "0007")
        assert store.current() == "0007"
        with store.engine.connect() as conn:
            # Only Felix's rows are left: 0007 reads every probe and finding as Felix's.
            assert conn.execute(text("SELECT count(*) FROM node_probes")).scalar() == 3
            assert conn.execute(text("SELECT count(*) FROM findings")).scalar() == 1
            assert conn.execute(text("SELECT nodes_total FROM latest_cluster_status")
                                ).scalar() == 3
            insp = inspect(conn)
            tables, views = set(insp.get_table_names()), set(insp.get_view_names())
            assert not tables & {"control_scans", "daily_control_summary"}
            assert not views & {"daily_control_compliance", "latest_control_status"}
            assert "node_failure_streaks" in views
            columns = {c["name"] for c in insp.get_columns("node_probes")}
            assert not columns & {"control", "pod"}
        store.upgrade()
        assert store.current() == store.head()
        with store.sessions() as s:
            [row] = s.scalars(select(ControlScan))
            assert (row.cluster_scan_id, row.control, row.status) == (cid, FELIX, "non_compliant")
        command.check(alembic_config(db_url))
