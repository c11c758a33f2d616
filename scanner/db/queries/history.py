"""The read side of the results database: the data a compliance report is made of.

`load_report` turns stored scans into plain frozen dataclasses (`ReportData`) that the
templates in `reports/` render and that `reports.integrity` hashes. Besides `scanner.db.store`,
this is the only module that opens SQLAlchemy sessions.

Definitions the report relies on (all dates and days are UTC):

* period: `since` 00:00 to `until` 24:00, both days inclusive;
* day point: the last scan of that day, as the `daily_cluster_summary` rollup records it;
  the ratio is pass nodes / nodes scanned;
* latest scan of a cluster: the scan of its last day point in the period;
* previous scan: the cluster's last scan before the latest one that probed at least one node,
  whether or not it lies inside the period;
* changes (by node name, previous -> latest): *new* = absent from the previous scan,
  *removed* = absent from the latest, *fixed* = fail/unknown -> pass,
  *regressed* = pass -> fail/unknown, *other* = fail <-> unknown;
* controls: the latest scan's result per control (`control_scans`), Felix's first; the nodes,
  their changes, the vantages and the day points are Felix's (node_probes of control
  felix-metrics), the other controls' targets are theirs; `control_series` holds each
  control's day points (`daily_control_summary`). Rows stored before the control catalogue
  belong to felix-metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from scanner import __version__
from scanner.core.errors import ReportError, StoreError
from scanner.core.records import CONTROL_IDS, FELIX
from scanner.db.models import (
    OTHER_CONTROLS,
    ClusterScan,
    ControlScan,
    DailyClusterSummary,
    DailyControlSummary,
    FindingRow,
    NodeProbe,
    ScanRun,
)
from scanner.db.store import Store, redact_url

REPORT_TITLE = "Calico Felix metrics endpoint compliance report"
VERDICT_ORDER = {"fail": 0, "waived": 1, "unknown": 2, "pass": 3}
SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}


# --- the report data -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanRef:
    """Which stored scan a piece of the report comes from."""

    scan_id: int  # ScanRun.id: the `scan_id` that `felixscan scan --json` prints
    cluster_scan_id: int
    started_at: datetime
    finished_at: datetime
    status: str


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """One node of the latest scan: what was probed, what answered, and the verdict."""

    name: str
    address: str | None
    port: int
    state: str
    protocol: str | None
    felix: bool | None
    http_status: int | None
    verdict: str
    declared_enabled: bool | None
    declared_source: str | None
    pod_current: bool | None
    node_ready: bool | None
    tls_version: str | None
    tls_subject: str | None
    tls_issuer: str | None
    tls_self_signed: bool | None
    tls_not_after: datetime | None
    tls_sha256: str | None
    felix_host: str | None
    error: str | None
    addresses: list[dict[str, Any]] | None = None  # every address probed, when more than one
    declared_host: str | None = None
    node_view: Mapping[str, Any] | None = None  # what node-check said on the node, if read
    # The pod whose spec decided the declared state: calico-node's for Felix's nodes, for
    # Typha's and kube-controllers' targets the component's pod (`name` is its node).
    pod: str | None = None


@dataclass(frozen=True, slots=True)
class FindingItem:
    id: str
    severity: str
    node: str | None
    message: str
    evidence: Mapping[str, Any]
    remediation: str
    waiver: str | None = None  # the waiver in force that accepted it
    control: str = FELIX  # the control whose check raised it


@dataclass(frozen=True, slots=True)
class ControlEntry:
    """One control's result in the latest scan (`felix-metrics`, `typha-metrics`,
    `kube-controllers-metrics`): status, declared state and target counts."""

    control: str
    status: str  # compliant, non_compliant, error
    installed: bool  # False: the component is not deployed (nothing to expose)
    declared_enabled: bool | None
    declared_source: str | None
    declared_port: int | None
    error: str | None
    targets_total: int
    targets_pass: int
    targets_fail: int
    targets_unknown: int
    targets_waived: int
    namespace: str | None
    workload: str | None  # DaemonSet or Deployment name
    image: str | None
    # Typha's and kube-controllers' targets (one per pod and address; `name` is the node, `pod`
    # the pod), failing first; empty for felix-metrics, whose nodes are ClusterReport.nodes.
    targets: tuple[NodeEntry, ...] = ()
    declared_host: str | None = None  # "" = every interface


@dataclass(frozen=True, slots=True)
class ControlPoint:
    """One day of one control's trend: the counts of the last scan of that day that checked
    it (`daily_control_summary`)."""

    control: str
    day: date
    scan_id: int
    cluster_scan_id: int
    status: str
    targets: int  # Felix's nodes, Typha's or kube-controllers' targets
    passing: int
    failing: int
    unknown: int
    ratio: float | None  # passing / targets; None when nothing was probed
    waived: int = 0


@dataclass(frozen=True, slots=True)
class DayPoint:
    """One day of the trend: the counts of the last scan of that day."""

    day: date
    scan_id: int
    cluster_scan_id: int
    status: str
    nodes: int
    passing: int
    failing: int
    unknown: int
    ratio: float | None  # passing / nodes; None when no node was scanned (an error scan)


@dataclass(frozen=True, slots=True)
class NodeChange:
    node: str
    before: str | None  # verdict in the previous scan; None: the node was not there
    after: str | None  # verdict in the latest scan; None: the node is gone


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed per node between the previous scan and the latest one."""

    previous: ScanRef
    new: tuple[NodeChange, ...]
    removed: tuple[NodeChange, ...]
    fixed: tuple[NodeChange, ...]
    regressed: tuple[NodeChange, ...]
    other: tuple[NodeChange, ...]  # fail <-> unknown: still not passing, differently


@dataclass(frozen=True, slots=True)
class Method:
    """How the latest scan was made, as recorded with it."""

    scanner_host: str  # the host the probes came from
    tool_version: str
    trigger: str
    probe: Mapping[str, Any]  # probe settings (timeouts, address type) when the scan stored them
    timings: Mapping[str, Any]  # seconds spent on the API, probing, storing
    vantage: str | None = None  # where the probes came from, by name (None: scanner_host)


@dataclass(frozen=True, slots=True)
class VantageResult:
    """The latest scan of a cluster in the period from one vantage point (where the probes
    came from): a node fails if any vantage's latest scan fails it."""

    vantage: str
    scan: ScanRef
    failing: tuple[str, ...]  # the nodes that scan failed
    unknown: int


@dataclass(frozen=True, slots=True)
class ClusterReport:
    name: str
    latest: ScanRef
    install: str
    status: str  # compliant, non_compliant, error
    error: str | None
    declared_enabled: bool | None
    declared_source: str | None
    declared_port: int | None
    declared: Mapping[str, Any]  # port source, reason for unknown, TLS, as stored
    namespace: str | None
    daemonset: str | None
    image: str | None
    rollout: Mapping[str, Any] | None
    configuration: Mapping[str, Any]  # Felix env, FelixConfigurations, Installation, config file
    nodes_total: int
    nodes_pass: int
    nodes_fail: int
    nodes_unknown: int
    nodes: tuple[NodeEntry, ...]  # failing first, then unknown, then passing; natural name order
    nodes_pruned_at: datetime | None  # retention removed the node rows (the counts remain)
    findings: tuple[FindingItem, ...]  # worst first
    series: tuple[DayPoint, ...]
    changes: Changes | None
    changes_note: str | None  # why there are no changes to show, when `changes` is None
    method: Method
    nodes_waived: int = 0  # failing nodes whose risk a waiver in force accepted
    waivers: tuple[Mapping[str, Any], ...] = ()  # the waivers that applied, as stored then
    # The latest scan in the period from each vantage point, the latest scan's own first. With
    # more than one, `status` is the worst of them and `failing_anywhere` every node any of
    # them failed.
    vantages: tuple[VantageResult, ...] = ()
    failing_anywhere: tuple[str, ...] = ()
    # The latest scan's result per control checked, in CONTROL_IDS order (scans stored before
    # the control catalogue: felix-metrics alone), and each control's day points in the period,
    # by control then day (`control_trend` groups them).
    controls: tuple[ControlEntry, ...] = ()
    control_series: tuple[ControlPoint, ...] = ()

    @property
    def control_trend(self) -> Mapping[str, tuple[ControlPoint, ...]]:
        """Each control's day points in the period, oldest first, in CONTROL_IDS order."""
        out: dict[str, list[ControlPoint]] = {}
        for point in self.control_series:
            out.setdefault(point.control, []).append(point)
        return {control: tuple(points) for control, points in out.items()}

    def control(self, control_id: str) -> ControlEntry | None:
        return next((c for c in self.controls if c.control == control_id), None)


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything a report shows; `reports.integrity.canonical_json` hashes exactly this."""

    title: str
    generated_at: datetime
    tool_version: str  # the felixscan that made the report
    database: str  # the database URL without its password
    since: date
    until: date
    clusters: tuple[ClusterReport, ...]
    not_scanned: tuple[str, ...]  # clusters asked for by name with no scan in the period
    scan_ids: tuple[int, ...]  # every ScanRun.id the report draws on
    # Every scan drawn on came from `felixscan demo`: emulated clusters, not a real fleet.
    emulated: bool = False
    # Who prepared the report and who owns the control (config `report.preparer` and
    # `report.owner`), printed on the cover for sign-off; None when not configured.
    preparer: str | None = None
    owner: str | None = None


# --- loading -------------------------------------------------------------------------------


def load_report(source: Store | sessionmaker[Session] | Engine, *,
                clusters: Sequence[str] = (), since: date | None = None,
                until: date | None = None, now: datetime | None = None) -> ReportData:
    """The report data for `clusters` (all when empty) over `since`..`until` (UTC days).

    `since` defaults to the day of the first scan of those clusters, `until` to today.
    Raises ReportError for an unknown cluster, an inverted or empty period, StoreError when
    the database cannot be read.
    """
    sessions, database = _sessions(source)
    try:
        return _load(sessions, database, clusters=clusters, since=since, until=until, now=now)
    except (OperationalError, DBAPIError) as exc:
        raise StoreError(f"cannot read database {database}: {exc.orig or exc} (is its schema "
                         "current? `felixscan db upgrade`)") from exc


def _load(sessions: sessionmaker[Session], database: str, *, clusters: Sequence[str],
          since: date | None, until: date | None, now: datetime | None) -> ReportData:
    generated_at = (now or datetime.now(UTC)).astimezone(UTC)
    until = until or generated_at.date()
    wanted = tuple(dict.fromkeys(clusters))  # keep the caller's order, drop repeats
    with sessions() as s:
        # Every row read below is committed and never changed afterwards except the day
        # rollups, and each query after the first is keyed by the scan ids the rollup gave,
        # so the queries agree with each other without a repeatable-read transaction.
        known = set(s.scalars(select(DailyClusterSummary.cluster).distinct()))
        if not known:
            raise ReportError(f"the database {database} holds no scans yet; run "
                              "`felixscan scan` first")
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ReportError(
                f"unknown cluster{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(n) for n in unknown)}; the database has scans of: "
                f"{_preview(sorted(known))}")
        names = sorted(wanted or known)
        if since is None:
            since = s.scalar(select(func.min(DailyClusterSummary.day))
                             .where(DailyClusterSummary.cluster.in_(names))) or until
        if since > until:
            raise ReportError(f"the period is empty: --since {since} is after --until {until}")

        reports: list[ClusterReport] = []
        not_scanned: list[str] = []
        for name in names:
            report = _cluster(s, name, since, until)
            if report is not None:
                reports.append(report)
            elif wanted:
                not_scanned.append(name)
    if not reports:
        which = ", ".join(names) if wanted else "any cluster"
        raise ReportError(f"no scans of {which} between {since} and {until} (UTC, inclusive); "
                          "choose another --since/--until")
    scan_ids = sorted({ref for r in reports for ref in _scan_ids(r)})
    with sessions() as s:
        triggers = set(s.scalars(select(ScanRun.trigger).where(ScanRun.id.in_(scan_ids))
                                 .distinct()))
    return ReportData(title=REPORT_TITLE, generated_at=generated_at, tool_version=__version__,
                      database=database, since=since, until=until, clusters=tuple(reports),
                      not_scanned=tuple(not_scanned), scan_ids=tuple(scan_ids),
                      emulated=triggers == {"demo"})


def _sessions(source: Store | sessionmaker[Session] | Engine) -> tuple[sessionmaker[Session], str]:
    if isinstance(source, Store):
        return source.sessions, redact_url(source.url)
    if isinstance(source, Engine):
        return sessionmaker(source), source.url.render_as_string(hide_password=True)
    bind = source.kw.get("bind")
    url = bind.url.render_as_string(hide_password=True) if isinstance(bind, Engine) else "?"
    return source, url


# Explicit columns rather than whole ORM rows: a report reads what it shows, and keeps working
# when later migrations add columns it does not need.
_SCAN_COLUMNS = (ClusterScan.id, ClusterScan.run_id, ClusterScan.started_at,
                 ClusterScan.finished_at, ClusterScan.status, ClusterScan.pruned_at)


def _cluster(s: Session, name: str, since: date, until: date) -> ClusterReport | None:
    # The trend comes from the day rollup written with every scan (the last scan of each day):
    # a year costs 365 small rows, never a snapshot or a node probe.
    d = DailyClusterSummary
    rows = s.execute(
        select(d.day, d.last_cluster_scan_id, ClusterScan.run_id, d.status, d.nodes, d.passing,
               d.failing, d.unknown)
        .join(ClusterScan, ClusterScan.id == d.last_cluster_scan_id)
        .where(d.cluster == name, d.day >= since, d.day <= until)
        .order_by(d.day)).all()
    if not rows:
        return None
    series = tuple(
        DayPoint(day=r.day, scan_id=r.run_id, cluster_scan_id=r.last_cluster_scan_id,
                 status=r.status, nodes=r.nodes, passing=r.passing, failing=r.failing,
                 unknown=r.unknown, ratio=r.passing / r.nodes if r.nodes else None)
        for r in rows)

    c = ClusterScan
    latest_row = s.execute(
        select(*_SCAN_COLUMNS, c.install, c.error, c.declared_enabled, c.declared_source,
               c.declared_port, c.namespace, c.daemonset, c.image, c.nodes_total, c.nodes_pass,
               c.nodes_fail, c.nodes_unknown, c.nodes_waived, c.waivers, c.snapshot, c.timings,
               ScanRun.scanner_host, ScanRun.tool_version, ScanRun.trigger, ScanRun.vantage)
        .join(ScanRun, ScanRun.id == c.run_id)
        .where(c.id == series[-1].cluster_scan_id)).one()
    latest = _ref(latest_row)
    probes = _probes(s, latest_row.id)
    nodes = probes.get(FELIX, ())
    previous_row = s.execute(
        select(*_SCAN_COLUMNS)
        .where(c.cluster == name, c.nodes_total > 0, c.started_at < latest_row.started_at)
        .order_by(c.started_at.desc(), c.id.desc()).limit(1)).first()
    changes, note = None, None
    if not nodes:
        note = (f"the node results of this scan were removed by retention on "
                f"{latest_row.pruned_at:%Y-%m-%d}" if latest_row.pruned_at
                else "the latest scan probed no node")
    elif previous_row is None:
        note = "no earlier scan of this cluster probed any node"
    elif previous_row.pruned_at is not None:
        note = (f"the node results of the previous scan ({previous_row.run_id}) were removed "
                f"by retention on {previous_row.pruned_at:%Y-%m-%d}")
    else:
        before = {node: verdict for node, verdict in s.execute(
            select(NodeProbe.node, NodeProbe.verdict)
            .where(NodeProbe.cluster_scan_id == previous_row.id, NodeProbe.control == FELIX))}
        changes = _changes(_ref(previous_row), before, nodes)

    vantages = vantage_results(s, name, since, until, latest_id=latest_row.id,
                               latest_failing=tuple(n.name for n in nodes
                                                    if n.verdict == "fail"))
    failing_anywhere = {f for v in vantages for f in v.failing}
    worst = _worst([v.scan.status for v in vantages]) if len(vantages) > 1 else None
    snap: Mapping[str, Any] = latest_row.snapshot or {}
    findings = [
        FindingItem(id=f.finding_id, severity=f.severity, node=f.node, message=f.message,
                    evidence=f.evidence or {}, remediation=f.remediation or "",
                    waiver=f.waiver, control=f.control)
        for f in s.execute(select(FindingRow.finding_id, FindingRow.severity, FindingRow.node,
                                  FindingRow.message, FindingRow.evidence,
                                  FindingRow.remediation, FindingRow.waiver, FindingRow.control)
                           .where(FindingRow.cluster_scan_id == latest_row.id)
                           .order_by(FindingRow.id))]
    findings.sort(key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), f.id,
                                 natural_key(f.node or ""), control_rank(f.control)))
    return ClusterReport(
        name=name, latest=latest, install=latest_row.install,
        status=worst or latest_row.status,
        error=latest_row.error, declared_enabled=latest_row.declared_enabled,
        declared_source=latest_row.declared_source, declared_port=latest_row.declared_port,
        declared=snap.get("declared") or {}, namespace=latest_row.namespace,
        daemonset=latest_row.daemonset, image=latest_row.image, rollout=snap.get("rollout"),
        configuration={k: snap.get(k) for k in ("env", "felix_configurations", "installation",
                                                "config_file", "container", "felix_crd",
                                                "pods", "nodes") if k in snap},
        nodes_total=latest_row.nodes_total, nodes_pass=latest_row.nodes_pass,
        nodes_fail=latest_row.nodes_fail, nodes_unknown=latest_row.nodes_unknown,
        nodes=nodes, nodes_pruned_at=latest_row.pruned_at, findings=tuple(findings),
        series=series, changes=changes, changes_note=note,
        method=Method(scanner_host=latest_row.scanner_host,
                      tool_version=latest_row.tool_version, trigger=latest_row.trigger,
                      probe=snap.get("probe") or {}, timings=latest_row.timings or {},
                      vantage=latest_row.vantage or latest_row.scanner_host),
        nodes_waived=latest_row.nodes_waived or 0, waivers=tuple(latest_row.waivers or ()),
        vantages=vantages, failing_anywhere=tuple(sorted(failing_anywhere, key=natural_key)),
        controls=control_entries(s, latest_row.id, probes),
        control_series=_control_series(s, name, since, until))


def _ref(row: Any) -> ScanRef:
    return ScanRef(scan_id=row.run_id, cluster_scan_id=row.id, started_at=row.started_at,
                   finished_at=row.finished_at, status=row.status)


_NODE_COLUMNS = (NodeProbe.node.label("name"), NodeProbe.address, NodeProbe.port, NodeProbe.state,
                 NodeProbe.protocol, NodeProbe.felix, NodeProbe.http_status, NodeProbe.verdict,
                 NodeProbe.declared_enabled, NodeProbe.declared_source, NodeProbe.pod_current,
                 NodeProbe.node_ready, NodeProbe.tls_version, NodeProbe.tls_subject,
                 NodeProbe.tls_issuer, NodeProbe.tls_self_signed, NodeProbe.tls_not_after,
                 NodeProbe.tls_sha256, NodeProbe.felix_host, NodeProbe.error,
                 NodeProbe.addresses, NodeProbe.declared_host, NodeProbe.node_view,
                 NodeProbe.pod)


def _probes(s: Session, cluster_scan_id: int) -> dict[str, tuple[NodeEntry, ...]]:
    """Every probe row of a scan by control (Felix's nodes under FELIX), each list failing
    first: one query, whatever the controls."""
    # Plain column tuples, not ORM objects: at 5,000 nodes identity-mapping them costs more
    # than the query.
    by_control: dict[str, list[NodeEntry]] = {}
    for r in s.execute(select(NodeProbe.control, *_NODE_COLUMNS)
                       .where(NodeProbe.cluster_scan_id == cluster_scan_id)):
        fields = r._asdict()
        by_control.setdefault(fields.pop("control"), []).append(NodeEntry(**fields))
    return {control: _sorted_nodes(rows) for control, rows in by_control.items()}


def _sorted_nodes(rows: list[NodeEntry]) -> tuple[NodeEntry, ...]:
    rows.sort(key=lambda n: (VERDICT_ORDER.get(n.verdict, 2), natural_key(n.name), n.port,
                             n.pod or ""))
    return tuple(rows)


def control_rank(control: str) -> tuple[int, str]:
    """Sort key: the controls in CONTROL_IDS order, any other after them by name."""
    return (CONTROL_IDS.index(control) if control in CONTROL_IDS else len(CONTROL_IDS), control)


_CONTROL_COLUMNS = (ControlScan.control, ControlScan.status, ControlScan.installed,
                    ControlScan.declared_enabled, ControlScan.declared_source,
                    ControlScan.declared_port, ControlScan.error, ControlScan.targets_total,
                    ControlScan.targets_pass, ControlScan.targets_fail,
                    ControlScan.targets_unknown, ControlScan.targets_waived,
                    ControlScan.namespace, ControlScan.workload, ControlScan.image,
                    ControlScan.declared_host)


def control_entries(s: Session, cluster_scan_id: int,
                    probes: Mapping[str, tuple[NodeEntry, ...]] | None = None
                    ) -> tuple[ControlEntry, ...]:
    """The controls of one cluster scan in CONTROL_IDS order, each but Felix's with its
    targets: from `probes` (the scan's probe rows by control) when given, else read."""
    rows = s.execute(select(*_CONTROL_COLUMNS)
                     .where(ControlScan.cluster_scan_id == cluster_scan_id)).all()
    if probes is None:
        probes = other_targets(s, cluster_scan_id) if any(
            r.control != FELIX and r.targets_total for r in rows) else {}
    entries = [ControlEntry(**r._asdict(),
                            targets=() if r.control == FELIX else probes.get(r.control, ()))
               for r in rows]
    entries.sort(key=lambda c: control_rank(c.control))
    return tuple(entries)


def other_targets(s: Session, cluster_scan_id: int) -> dict[str, tuple[NodeEntry, ...]]:
    """The probe rows of one scan's controls other than Felix's, by control, without reading
    Felix's nodes (a partial index holds only these rows)."""
    by_control: dict[str, list[NodeEntry]] = {}
    for r in s.execute(select(NodeProbe.control, *_NODE_COLUMNS)
                       .where(NodeProbe.cluster_scan_id == cluster_scan_id,
                              OTHER_CONTROLS)):
        fields = r._asdict()
        by_control.setdefault(fields.pop("control"), []).append(NodeEntry(**fields))
    return {control: _sorted_nodes(rows) for control, rows in by_control.items()}


def _control_series(s: Session, name: str, since: date,
                    until: date) -> tuple[ControlPoint, ...]:
    d = DailyControlSummary
    points = [
        ControlPoint(control=r.control, day=r.day, scan_id=r.run_id,
                     cluster_scan_id=r.last_cluster_scan_id, status=r.status,
                     targets=r.targets, passing=r.passing, failing=r.failing, unknown=r.unknown,
                     ratio=r.passing / r.targets if r.targets else None, waived=r.waived or 0)
        for r in s.execute(
            select(d.control, d.day, ClusterScan.run_id, d.last_cluster_scan_id, d.status,
                   d.targets, d.passing, d.failing, d.unknown, d.waived)
            .join(ClusterScan, ClusterScan.id == d.last_cluster_scan_id)
            .where(d.cluster == name, d.day >= since, d.day <= until))]
    points.sort(key=lambda p: (control_rank(p.control), p.day))
    return tuple(points)


def _changes(previous: ScanRef, before: Mapping[str, str],
             latest: Iterable[NodeEntry]) -> Changes:
    after: dict[str, str] = {}
    for n in latest:  # a node probed on several ports counts with its worst verdict
        if n.name not in after or VERDICT_ORDER.get(n.verdict, 2) < VERDICT_ORDER[after[n.name]]:
            after[n.name] = n.verdict if n.verdict in VERDICT_ORDER else "unknown"
    new, fixed, regressed, other = [], [], [], []
    for name, verdict in after.items():
        old = before.get(name)
        change = NodeChange(node=name, before=old, after=verdict)
        if old is None:
            new.append(change)
        elif old != "pass" and verdict == "pass":
            fixed.append(change)
        elif old == "pass" and verdict != "pass":
            regressed.append(change)
        elif old != verdict:
            other.append(change)
    removed = [NodeChange(node=name, before=old, after=None)
               for name, old in before.items() if name not in after]

    def ordered(items: list[NodeChange]) -> tuple[NodeChange, ...]:
        return tuple(sorted(items, key=lambda c: natural_key(c.node)))

    return Changes(previous=previous, new=ordered(new), removed=ordered(removed),
                   fixed=ordered(fixed), regressed=ordered(regressed), other=ordered(other))


_STATUS_ORDER = {"non_compliant": 0, "error": 1, "compliant": 2}


def _worst(statuses: Sequence[str]) -> str:
    return min(statuses, key=lambda st: _STATUS_ORDER.get(st, 1))


def vantage_results(s: Session, name: str, since: date, until: date | None, *, latest_id: int,
                    latest_failing: tuple[str, ...] | None = None) -> tuple[VantageResult, ...]:
    """The latest scan of `name` in the period from each vantage (scan_runs.vantage, else the
    host), the one of cluster scan `latest_id` first; each with the nodes it failed
    (`latest_failing`: those of `latest_id`, when the caller has read them already). `until`
    None: up to the newest scan."""
    c = ClusterScan
    vantage = func.coalesce(ScanRun.vantage, ScanRun.scanner_host)
    period = [c.cluster == name,
              c.started_at >= datetime.combine(since, datetime.min.time(), tzinfo=UTC)]
    if until is not None:
        period.append(c.started_at < datetime.combine(until + timedelta(days=1),
                                                      datetime.min.time(), tzinfo=UTC))
    newest = (select(vantage.label("vantage"), func.max(c.started_at).label("at"))
              .join(ScanRun, ScanRun.id == c.run_id).where(*period)
              .group_by(vantage).subquery("newest"))
    rows = s.execute(
        select(newest.c.vantage, *_SCAN_COLUMNS, c.nodes_unknown)
        .join(ScanRun, ScanRun.id == c.run_id)
        .join(newest, and_(newest.c.at == c.started_at,
                           newest.c.vantage == func.coalesce(ScanRun.vantage,
                                                             ScanRun.scanner_host)))
        .where(c.cluster == name)
        .order_by(c.started_at.desc(), c.id.desc())).all()
    seen: set[str] = set()
    out: list[VantageResult] = []
    for row in rows:
        if row.vantage in seen:
            continue
        seen.add(row.vantage)
        # The latest scan's nodes are read already; another vantage's cost one more query.
        failing = latest_failing if row.id == latest_id and latest_failing is not None \
            else tuple(s.scalars(
            select(NodeProbe.node).where(NodeProbe.cluster_scan_id == row.id,
                                         NodeProbe.control == FELIX,
                                         NodeProbe.verdict == "fail").distinct()))
        out.append(VantageResult(vantage=row.vantage, scan=_ref(row), failing=failing,
                                 unknown=row.nodes_unknown))
    out.sort(key=lambda v: (v.scan.cluster_scan_id != latest_id, v.vantage))
    return tuple(out)


def _scan_ids(report: ClusterReport) -> Iterable[int]:
    yield report.latest.scan_id
    yield from (v.scan.scan_id for v in report.vantages)
    yield from (p.scan_id for p in report.series)
    yield from (p.scan_id for p in report.control_series)
    if report.changes is not None:
        yield report.changes.previous.scan_id


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts worker-2 before worker-10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in _DIGITS.split(name) if part)


def _preview(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
