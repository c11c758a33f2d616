"""Read queries for the web page and the JSON API of `felixscan serve`; part of the store layer.

They read the rollups kept at write time (`daily_cluster_summary`, `node_states`) and the newest
cluster scan, never whole histories of `node_probes`, so the fleet overview costs
O(clusters x days shown) whatever the fleet's size. Results are small frozen dataclasses.
The trend rows of `/api/trend` come from `scanner.db.queries.trends`, as for `felixscan trend`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import and_, case, func, select, text
from sqlalchemy.orm import Session

from scanner.core.records import FELIX
from scanner.db.models import (
    ClusterScan,
    ControlScan,
    DailyClusterSummary,
    FindingRow,
    NodeProbe,
    NodeState,
    RemediationAction,
    ScanRun,
)
from scanner.db.queries.history import (
    ControlEntry,
    DayPoint,
    VantageResult,
    control_entries,
    control_rank,
    vantage_results,
)
from scanner.db.store import Store

T = TypeVar("T")
D = DailyClusterSummary
_SEVERITY_RANK = case({"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4},
                      value=FindingRow.severity, else_=9)


@dataclass(frozen=True, slots=True)
class LatestScan:
    """A cluster's newest stored scan, in short."""

    cluster: str
    cluster_scan_id: int
    scan_id: int
    started_at: datetime
    finished_at: datetime
    status: str
    install: str
    declared_enabled: bool | None
    declared_source: str | None
    declared_port: int | None
    nodes: int
    passing: int
    failing: int
    unknown: int
    error: str | None
    declared_host: str | None = None  # "" = every interface; a loopback address: loopback only
    waived: int = 0  # failing nodes whose risk a waiver in force accepted
    # control -> its status in this scan, in CONTROL_IDS order (scans stored before the control
    # catalogue: felix-metrics alone). `status` is the worst of them; the node counts and the
    # declared state above are Felix's.
    controls: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SparkPoint:
    day: date
    status: str
    nodes: int
    failing: int
    unknown: int
    ratio: float | None  # passing / nodes; None when no node was scanned (an error scan)


@dataclass(frozen=True, slots=True)
class ClusterOverview:
    name: str
    latest: LatestScan | None  # None: configured but never scanned
    points: tuple[SparkPoint, ...]  # one per day with a scan, oldest first
    controls: Mapping[str, str] = field(default_factory=dict)  # the latest scan's, by control


@dataclass(frozen=True, slots=True)
class ScanItem:
    cluster_scan_id: int
    scan_id: int
    cluster: str
    started_at: datetime
    finished_at: datetime
    status: str
    nodes: int
    passing: int
    failing: int
    unknown: int
    trigger: str
    scanner_host: str
    error: str | None


@dataclass(frozen=True, slots=True)
class RunItem:
    scan_id: int
    started_at: datetime
    finished_at: datetime | None
    status: str  # running, finished, aborted, skipped
    trigger: str
    scanner_host: str
    clusters: int


@dataclass(frozen=True, slots=True)
class FindingView:
    id: str
    severity: str
    node: str | None
    message: str
    remediation: str
    control: str = FELIX  # the control whose check raised it


@dataclass(frozen=True, slots=True)
class NodeIssue:
    """A node not passing in the latest scan, and since when."""

    node: str
    verdict: str
    since: datetime
    streak_scans: int
    address: str | None
    port: int | None
    state: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class RemediationView:
    id: int
    started_at: datetime
    finished_at: datetime | None
    trigger: str
    mode: str
    outcome: str
    message: str | None
    objects: int


@dataclass(frozen=True, slots=True)
class ClusterPage:
    name: str
    latest: LatestScan
    series: tuple[DayPoint, ...]  # for `reports.charts.trend_chart`
    scans: tuple[ScanItem, ...]  # newest first
    issues: tuple[NodeIssue, ...]
    issues_total: int
    findings: tuple[FindingView, ...]  # worst first
    findings_total: int
    remediation: tuple[RemediationView, ...]  # newest first
    # The latest scan in the shown period from each vantage point, the latest one first.
    vantages: tuple[VantageResult, ...] = ()
    # The latest scan's result per control, in CONTROL_IDS order, Typha's and
    # kube-controllers' with their targets (Felix's nodes are `issues` and the scans' counts).
    controls: tuple[ControlEntry, ...] = ()


def _read(store: Store, work: Callable[[Session], T]) -> T:
    with store.reading() as s:
        return work(s)


def ping(store: Store) -> None:
    """Raise StoreError unless the database answers and holds felixscan's tables."""
    def work(s: Session) -> None:
        s.execute(text("SELECT 1"))
        s.execute(select(D.cluster).limit(1))
    _read(store, work)


def _latest_query() -> Any:
    newest = (select(D.cluster, func.max(D.day).label("day")).group_by(D.cluster)
              .subquery("newest"))
    return (select(ClusterScan.cluster, ClusterScan.id, ClusterScan.run_id,
                   ClusterScan.started_at, ClusterScan.finished_at, ClusterScan.status,
                   ClusterScan.install, ClusterScan.declared_enabled,
                   ClusterScan.declared_source, ClusterScan.declared_port,
                   ClusterScan.nodes_total, ClusterScan.nodes_pass, ClusterScan.nodes_fail,
                   ClusterScan.nodes_unknown, ClusterScan.error, ClusterScan.declared_host,
                   ClusterScan.nodes_waived)
            .join(D, D.last_cluster_scan_id == ClusterScan.id)
            .join(newest, and_(newest.c.cluster == D.cluster, newest.c.day == D.day)))


def _latest(row: Any, controls: Mapping[str, Mapping[str, str]]) -> LatestScan:
    return LatestScan(cluster=row[0], cluster_scan_id=row[1], scan_id=row[2], started_at=row[3],
                      finished_at=row[4], status=row[5], install=row[6],
                      declared_enabled=row[7], declared_source=row[8], declared_port=row[9],
                      nodes=row[10], passing=row[11], failing=row[12], unknown=row[13],
                      error=row[14], declared_host=row[15], waived=row[16] or 0,
                      controls=controls.get(row[0]) or {FELIX: row[5]})


def latest_controls(s: Session, cluster: str | None = None) -> dict[str, dict[str, str]]:
    """cluster -> control -> status in the cluster's latest scan (the one its newest
    `daily_cluster_summary` row names), in CONTROL_IDS order; one query for the fleet."""
    newest = (select(D.cluster, func.max(D.day).label("day")).group_by(D.cluster)
              .subquery("newest"))
    q = (select(D.cluster, ControlScan.control, ControlScan.status)
         .join(newest, and_(newest.c.cluster == D.cluster, newest.c.day == D.day))
         .join(ControlScan, ControlScan.cluster_scan_id == D.last_cluster_scan_id))
    if cluster is not None:
        q = q.where(D.cluster == cluster)
    found: dict[str, list[tuple[str, str]]] = {}
    for name, control, status in s.execute(q):
        found.setdefault(name, []).append((control, status))
    return {name: dict(sorted(pairs, key=lambda p: control_rank(p[0])))
            for name, pairs in found.items()}


def known_clusters(store: Store) -> list[str]:
    return _read(store, lambda s: sorted(s.scalars(select(D.cluster).distinct())))


def fleet_overview(store: Store, *, since: date,
                   configured: Sequence[str] = ()) -> list[ClusterOverview]:
    """Every cluster with scans or in the configuration: its latest scan and daily points."""
    def work(s: Session) -> list[ClusterOverview]:
        controls = latest_controls(s)
        latest = {r[0]: _latest(r, controls) for r in s.execute(_latest_query())}
        points: dict[str, list[SparkPoint]] = {}
        # Ordered by day alone, so the day index serves the range; each cluster's list
        # still comes out oldest first.
        for cluster, day, status, nodes, passing, failing, unknown in s.execute(
                select(D.cluster, D.day, D.status, D.nodes, D.passing, D.failing, D.unknown)
                .where(D.day >= since).order_by(D.day)):
            points.setdefault(cluster, []).append(SparkPoint(
                day, status, nodes, failing, unknown, passing / nodes if nodes else None))
        names = sorted(set(latest) | set(configured))
        return [ClusterOverview(name=n, latest=latest.get(n), points=tuple(points.get(n, ())),
                                controls=latest[n].controls if n in latest else {})
                for n in names]
    return _read(store, work)


def cluster_page(store: Store, name: str, *, since: date, scans: int = 30, issues: int = 300,
                 findings: int = 200, actions: int = 50) -> ClusterPage | None:
    """The cluster's page data; None when the database has no scan of it."""
    def work(s: Session) -> ClusterPage | None:
        row = s.execute(_latest_query().where(D.cluster == name)).first()
        if row is None:
            return None
        latest = _latest(row, latest_controls(s, name))
        series = tuple(
            DayPoint(day=r.day, scan_id=r.run_id, cluster_scan_id=r.last_cluster_scan_id,
                     status=r.status, nodes=r.nodes, passing=r.passing, failing=r.failing,
                     unknown=r.unknown, ratio=r.passing / r.nodes if r.nodes else None)
            for r in s.execute(
                select(D.day, ClusterScan.run_id, D.last_cluster_scan_id, D.status, D.nodes,
                       D.passing, D.failing, D.unknown)
                .join(ClusterScan, ClusterScan.id == D.last_cluster_scan_id)
                .where(D.cluster == name, D.day >= since).order_by(D.day)))
        issue_filter = (NodeState.cluster == name, NodeState.verdict != "pass",
                        NodeState.last_cluster_scan_id == latest.cluster_scan_id)
        issues_total = s.scalar(select(func.count()).select_from(NodeState)
                                .where(*issue_filter)) or 0
        issue_rows = s.execute(
            select(NodeState.node, NodeState.verdict, NodeState.since, NodeState.streak_scans,
                   NodeProbe.address, NodeProbe.port, NodeProbe.state, NodeProbe.error)
            .outerjoin(NodeProbe, and_(NodeProbe.cluster_scan_id == latest.cluster_scan_id,
                                       NodeProbe.node == NodeState.node,
                                       NodeProbe.control == FELIX,
                                       NodeProbe.verdict != "pass"))
            .where(*issue_filter)
            .order_by(NodeState.verdict, NodeState.since, NodeState.node).limit(issues))
        finding_filter = FindingRow.cluster_scan_id == latest.cluster_scan_id
        findings_total = s.scalar(select(func.count()).select_from(FindingRow)
                                  .where(finding_filter)) or 0
        finding_rows = s.execute(
            select(FindingRow.finding_id, FindingRow.severity, FindingRow.node,
                   FindingRow.message, FindingRow.remediation, FindingRow.control)
            .where(finding_filter).order_by(_SEVERITY_RANK, FindingRow.finding_id,
                                            FindingRow.node, FindingRow.id).limit(findings))
        action_rows = s.scalars(select(RemediationAction)
                                .where(RemediationAction.cluster == name)
                                .order_by(RemediationAction.started_at.desc(),
                                          RemediationAction.id.desc()).limit(actions))
        return ClusterPage(
            name=name, latest=latest, series=series,
            scans=tuple(_scans(s, cluster=name, limit=scans, before=None)),
            issues=tuple(NodeIssue(*r) for r in issue_rows), issues_total=issues_total,
            findings=tuple(FindingView(*r) for r in finding_rows), findings_total=findings_total,
            remediation=tuple(
                RemediationView(id=a.id, started_at=a.started_at, finished_at=a.finished_at,
                                trigger=a.trigger, mode=a.mode, outcome=a.outcome,
                                message=a.message, objects=len(a.objects or []))
                for a in action_rows),
            vantages=vantage_results(s, name, since, None,
                                     latest_id=latest.cluster_scan_id),
            controls=control_entries(s, latest.cluster_scan_id))
    return _read(store, work)


def _scans(s: Session, *, cluster: str | None, limit: int, before: int | None) -> list[ScanItem]:
    q = (select(ClusterScan.id, ClusterScan.run_id, ClusterScan.cluster, ClusterScan.started_at,
                ClusterScan.finished_at, ClusterScan.status, ClusterScan.nodes_total,
                ClusterScan.nodes_pass, ClusterScan.nodes_fail, ClusterScan.nodes_unknown,
                ScanRun.trigger, ScanRun.scanner_host, ClusterScan.error)
         .join(ScanRun, ScanRun.id == ClusterScan.run_id))
    if cluster is not None:
        q = q.where(ClusterScan.cluster == cluster)
    if before is not None:
        q = q.where(ClusterScan.id < before)
    q = q.order_by(ClusterScan.started_at.desc(), ClusterScan.id.desc()).limit(limit)
    return [ScanItem(*cast(tuple[Any, ...], r)) for r in s.execute(q)]


def list_scans(store: Store, *, cluster: str | None = None, limit: int = 50,
               before: int | None = None) -> list[ScanItem]:
    """Cluster scans, newest first; `before` pages on by cluster scan id."""
    return _read(store, lambda s: _scans(s, cluster=cluster, limit=limit, before=before))


def list_runs(store: Store, *, limit: int = 50, before: int | None = None) -> list[RunItem]:
    """Scan runs (including skipped and aborted ones), newest first."""
    def work(s: Session) -> list[RunItem]:
        counts = (select(ClusterScan.run_id, func.count().label("n"))
                  .group_by(ClusterScan.run_id).subquery("counts"))
        q = (select(ScanRun.id, ScanRun.started_at, ScanRun.finished_at, ScanRun.status,
                    ScanRun.trigger, ScanRun.scanner_host, func.coalesce(counts.c.n, 0))
             .outerjoin(counts, counts.c.run_id == ScanRun.id))
        if before is not None:
            q = q.where(ScanRun.id < before)
        q = q.order_by(ScanRun.id.desc()).limit(limit)
        return [RunItem(*r) for r in s.execute(q)]
    return _read(store, work)
