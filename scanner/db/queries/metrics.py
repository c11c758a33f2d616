"""The database's figures behind `/metrics` (`scanner.web.metrics`): each cluster's latest scan,
from the newest `daily_cluster_summary` row and one index probe into `cluster_scans`, and that
scan's status per control (`control_scans`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, select

from scanner.core.records import FELIX
from scanner.db.models import ClusterScan, DailyClusterSummary
from scanner.db.queries.pages import latest_controls
from scanner.db.store import Store


@dataclass(frozen=True, slots=True)
class ClusterState:
    """A cluster's latest scan, in the figures `/metrics` exports."""

    cluster: str
    status: str
    nodes: int
    passing: int
    failing: int
    unknown: int
    last_scan: datetime  # when the latest scan started
    last_success: datetime | None  # when the latest scan that was not an error started
    waived: int = 0  # failing nodes whose risk a waiver in force accepted
    # control -> its status in the latest scan, in CONTROL_IDS order (`status` is the worst;
    # scans stored before the control catalogue: felix-metrics alone)
    controls: Mapping[str, str] = field(default_factory=dict)


def cluster_states(store: Store) -> list[ClusterState]:
    """Every cluster with a stored scan, by name; raises StoreError."""
    d, c = DailyClusterSummary, ClusterScan
    newest = (select(d.cluster, func.max(d.day).label("day")).group_by(d.cluster)
              .subquery("newest"))
    # Walks the cluster's index from its newest scan back to the first that is not an error:
    # one row, unless the cluster has failed many times in a row.
    success = (select(c.started_at).where(c.cluster == d.cluster, c.status != "error")
               .order_by(c.started_at.desc()).limit(1).correlate(d).scalar_subquery())
    query = (select(d.cluster, d.status, d.nodes, d.passing, d.failing, d.unknown,
                    d.last_started_at, success.label("last_success"), d.waived)
             .join(newest, and_(newest.c.cluster == d.cluster, newest.c.day == d.day))
             .order_by(d.cluster))
    with store.reading() as s:
        controls = latest_controls(s)
        return [ClusterState(*row, controls=controls.get(row[0]) or {FELIX: row[1]})
                for row in s.execute(query)]
