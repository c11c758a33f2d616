"""Trend queries for analysts: per cluster (or per cluster and control) and day, and the nodes
that keep failing.

Part of the store layer (it opens SQLAlchemy sessions). Reads only the rollups that every scan
keeps up to date in its own transaction (`daily_cluster_summary`, `daily_control_summary`,
`node_states`), so a year of a fleet answers in O(clusters x days) and O(failing nodes), never
O(probes). Streaks are Felix's nodes'.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Connection, String, and_, func, select, type_coerce
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


# One point as the database returns it, its day as ISO text: (cluster, day, nodes, passing,
# failing, unknown, status, scans, waived); `nodes` is the control's targets for a control.
TrendTuple = tuple[str, str, int, int, int, int, str, int, int]


@dataclass(frozen=True, slots=True)
class TrendTable:
    """The points of `trend` as the plain tuples the database returned, for callers that
    encode a fleet's year of them (the JSON API): no record, no date object per point."""

    control: str | None
    rows: Sequence[TrendTuple]

    def points(self) -> list[TrendPoint]:
        control = self.control
        return [TrendPoint(cluster=cluster, day=date.fromisoformat(day), nodes=nodes,
                           failing=failing, unknown=unknown,
                           ratio=passing / nodes if nodes else None, status=status,
                           scans=scans, waived=waived, control=control)
                for cluster, day, nodes, passing, failing, unknown, status, scans, waived
                in self.rows]

    def json(self) -> str:
        """`[p.as_dict() for p in self.points()]` as `json.dumps(..., ensure_ascii=False)`
        writes it, byte for byte, without a dict per point: each cluster's and status's JSON
        string and each distinct ratio are encoded once (the rows come grouped by cluster).
        The counts are the database's integers (NOT NULL columns), written as `json` would."""
        statuses: dict[str, str] = {}
        ratios: dict[tuple[int, int], str] = {}
        tail = "}" if self.control is None else f', "control": {_json_str(self.control)}}}'
        out: list[str] = []
        append = out.append
        cluster_now: str | None = None
        head = ""
        for cluster, day, nodes, passing, failing, unknown, status, scans, waived in self.rows:
            if cluster != cluster_now:
                cluster_now = cluster
                head = '{"cluster": ' + _json_str(cluster) + ', "day": "'
            if passing == nodes and nodes:
                ratio = "1.0"  # round(1.0, 6)
            else:
                ratio = ratios.get((passing, nodes)) or ratios.setdefault(
                    (passing, nodes), repr(round(passing / nodes, 6)) if nodes else "null")
            quoted = statuses.get(status) or statuses.setdefault(status, _json_str(status))
            append(f'{head}{day}", "nodes": {nodes}, "failing": {failing}, '
                   f'"unknown": {unknown}, "ratio": {ratio}, "status": {quoted}, '
                   f'"scans": {scans}, "waived": {waived}{tail}')
        return "[" + ", ".join(out) + "]"


def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def trend(store: Store, *, clusters: Sequence[str] = (), days: int = 30,
          today: date | None = None, control: str | None = None) -> list[TrendPoint]:
    """One point per cluster and UTC day over the last `days` days (today included).

    `control` None: each cluster as a whole (`daily_cluster_summary`); a control ID: that
    control's figures (`daily_control_summary`), each point naming it, its `nodes` the
    control's targets.
    """
    return trend_table(store, clusters=clusters, days=days, today=today,
                       control=control).points()


def trend_table(store: Store, *, clusters: Sequence[str] = (), days: int = 30,
                today: date | None = None, control: str | None = None) -> TrendTable:
    """`trend`'s points as plain tuples, in the same order (cluster, then day)."""
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=max(days, 1) - 1)
    t: type[DailyClusterSummary] | type[DailyControlSummary]
    t, nodes = ((DailyClusterSummary, DailyClusterSummary.nodes) if control is None
                else (DailyControlSummary, DailyControlSummary.targets))
    with store.reading() as s:
        conn = s.connection()
        # Plain columns on the session's connection, the day read as the text SQLite stores
        # (PostgreSQL formats it): a year of a fleet is thousands of rows, and a mapped
        # object or a parsed date each would cost more than the query.
        day = (type_coerce(func.to_char(t.day, "YYYY-MM-DD"), String)
               if conn.dialect.name == "postgresql" else type_coerce(t.day, String))
        stmt = (select(t.cluster, day, nodes, t.passing, t.failing, t.unknown, t.status,
                       t.scans, t.waived)
                .order_by(t.cluster, t.day))
        if control is not None:
            stmt = stmt.where(DailyControlSummary.control == control,
                              t.day >= first, t.day <= today)
        elif conn.dialect.name == "sqlite" and _most_days(conn, first=first, today=today):
            # SQLite has no statistics: it would read the day index and sort what it found.
            # When the period holds most of the table, `likely` steers it to read the table
            # in primary-key order (cluster, day), already the order asked for.
            stmt = stmt.where(func.likely(t.day >= first), func.likely(t.day <= today))
        else:
            stmt = stmt.where(t.day >= first, t.day <= today)
        if clusters:
            stmt = stmt.where(t.cluster.in_(list(clusters)))
        rows = conn.execute(stmt).all()
    return TrendTable(control=control, rows=rows)


def _most_days(conn: Connection, *, first: date, today: date) -> bool:
    """Does the period [first, today] span at least half the days `daily_cluster_summary`
    holds (one probe of its day index)?"""
    oldest = conn.execute(select(func.min(DailyClusterSummary.day))).scalar()
    return oldest is None or (today - first) * 2 >= today - oldest


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
