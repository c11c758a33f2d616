"""Trend queries for analysts: per cluster (or per cluster and control) and day, and the nodes
that keep failing.

Part of the store layer (it opens SQLAlchemy sessions). Reads only the rollups that every scan
keeps up to date in its own transaction (`daily_cluster_summary`, `daily_control_summary`,
`node_states`), so a year of a fleet answers in O(clusters x days) and O(failing nodes), never
O(probes). Streaks are Felix's nodes'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.orm import aliased

from scanner.db.models import DailyClusterSummary, DailyControlSummary, NodeState
from scanner.db.store import Store


@dataclass(frozen=True, slots=True)
class TrendPoint:
    cluster: str
    day: date
    nodes: int  # nodes scanned by the day's last scan
    failing: int
    unknown: int
    ratio: float | None  # passing / nodes; None when no node was scanned (the scan failed)
    status: str
    scans: int  # scans of the cluster that day
    waived: int = 0  # failing nodes whose risk a waiver in force accepted (not in `failing`)
    # None: the cluster as a whole (status the worst of its controls, counts Felix's nodes);
    # a control ID: that control's figures, `nodes` its targets, `scans` the scans checking it.
    control: str | None = None

    def as_dict(self) -> dict[str, object]:
        row: dict[str, object] = {
            "cluster": self.cluster, "day": self.day.isoformat(), "nodes": self.nodes,
            "failing": self.failing, "unknown": self.unknown,
            "ratio": None if self.ratio is None else round(self.ratio, 6),
            "status": self.status, "scans": self.scans, "waived": self.waived}
        if self.control is not None:
            row["control"] = self.control
        return row


@dataclass(frozen=True, slots=True)
class Streak:
    cluster: str
    node: str
    verdict: str
    since: datetime  # the first scan of the current failing run
    scans: int  # consecutive scans in that run
    last_scan_at: datetime

    def as_dict(self) -> dict[str, object]:
        return {"cluster": self.cluster, "node": self.node, "verdict": self.verdict,
                "since": self.since.isoformat(), "scans": self.scans,
                "last_scan_at": self.last_scan_at.isoformat()}


def trend(store: Store, *, clusters: Sequence[str] = (), days: int = 30,
          today: date | None = None, control: str | None = None) -> list[TrendPoint]:
    """One point per cluster and UTC day over the last `days` days (today included).

    `control` None: each cluster as a whole (`daily_cluster_summary`); a control ID: that
    control's figures (`daily_control_summary`), each point naming it, its `nodes` the
    control's targets.
    """
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=max(days, 1) - 1)
    if control is not None:
        return _control_trend(store, control, clusters=clusters, first=first, today=today)
    t = DailyClusterSummary
    # Plain columns, not ORM entities: a year of a fleet is thousands of rows, and building
    # mapped objects for them would cost more than the query.
    stmt = (select(t.cluster, t.day, t.nodes, t.passing, t.failing, t.unknown, t.status,
                   t.scans, t.waived)
            .where(t.day >= first, t.day <= today).order_by(t.cluster, t.day))
    if clusters:
        stmt = stmt.where(t.cluster.in_(list(clusters)))
    with store.reading() as s:
        return [TrendPoint(cluster=cluster, day=day, nodes=nodes, failing=failing,
                           unknown=unknown, ratio=passing / nodes if nodes else None,
                           status=status, scans=scans, waived=waived)
                for cluster, day, nodes, passing, failing, unknown, status, scans, waived
                in s.execute(stmt)]


def _control_trend(store: Store, control: str, *, clusters: Sequence[str], first: date,
                   today: date) -> list[TrendPoint]:
    t = DailyControlSummary
    stmt = (select(t.cluster, t.day, t.targets, t.passing, t.failing, t.unknown, t.status,
                   t.scans, t.waived)
            .where(t.control == control, t.day >= first, t.day <= today)
            .order_by(t.cluster, t.day))
    if clusters:
        stmt = stmt.where(t.cluster.in_(list(clusters)))
    with store.reading() as s:
        return [TrendPoint(cluster=cluster, day=day, nodes=targets, failing=failing,
                           unknown=unknown, ratio=passing / targets if targets else None,
                           status=status, scans=scans, waived=waived, control=control)
                for cluster, day, targets, passing, failing, unknown, status, scans, waived
                in s.execute(stmt)]


def failing_streaks(store: Store, *, clusters: Sequence[str] = (), limit: int = 50,
                    include_unknown: bool = False) -> list[Streak]:
    """Nodes failing in their cluster's latest scan, longest current streak first."""
    n, d = NodeState, DailyClusterSummary
    later = aliased(DailyClusterSummary)
    newest = (select(d.cluster.label("cluster"), d.last_cluster_scan_id.label("scan_id"))
              .where(d.day == select(func.max(later.day)).where(later.cluster == d.cluster)
                     .correlate(d).scalar_subquery())
              .subquery())
    verdicts = ["fail", "unknown"] if include_unknown else ["fail"]
    stmt = (select(n.cluster, n.node, n.verdict, n.since, n.streak_scans, n.last_scan_at)
            .join(newest, and_(newest.c.cluster == n.cluster,
                               newest.c.scan_id == n.last_cluster_scan_id))
            .where(n.verdict.in_(verdicts))
            .order_by(n.since, n.cluster, n.node)
            .limit(limit))
    if clusters:
        stmt = stmt.where(n.cluster.in_(list(clusters)))
    with store.reading() as s:
        return [Streak(cluster=r.cluster, node=r.node, verdict=r.verdict, since=r.since,
                       scans=r.streak_scans, last_scan_at=r.last_scan_at)
                for r in s.execute(stmt)]
