"""Retention: prune raw probes past a horizon; remember rendered reports so their evidence stays.

Part of the store layer. Pruning deletes node probes (every control's targets) and node-level
findings of scans older than the horizon in small batches (each its own short transaction, so
no long lock), keeps the cluster scans, their control results (`control_scans`), cluster-level
findings and rollups, and never touches a scan that a stored report refers to. Nothing is
deleted unless a horizon is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import delete, func, select, update

from scanner.db.models import ClusterScan, FindingRow, NodeProbe, StoredReport
from scanner.db.store import Store


@dataclass(frozen=True, slots=True)
class PruneResult:
    cutoff: datetime
    scans: int  # cluster scans whose probes were removed
    probes: int
    findings: int
    kept_for_reports: int  # old cluster scans kept because a stored report refers to them
    batches: int


def record_report(store: Store, *, fmt: str, sha256: str, location: str | None,
                  clusters: Iterable[str], since: date, until: date, scan_ids: Iterable[int],
                  created_at: datetime | None = None) -> int:
    """Remember a rendered report; pruning keeps the scans it draws on."""
    with store.session() as s:
        row = StoredReport(created_at=created_at or datetime.now(UTC), format=fmt, sha256=sha256,
                           location=location, clusters=list(clusters), since=since, until=until,
                           scan_ids=sorted(set(scan_ids)), keep=True)
        s.add(row)
        s.flush()
        return row.id


def prune(store: Store, *, keep_days: int, batch_size: int = 5000, now: datetime | None = None,
          dry_run: bool = False, progress: Callable[[int, int], None] | None = None
          ) -> PruneResult:
    """Delete raw probes of scans that started more than `keep_days` days ago."""
    if keep_days < 1:
        raise ValueError("keep_days must be at least 1")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=keep_days)
    with store.reading() as s:
        protected_runs: set[int] = set()
        for ids in s.scalars(select(StoredReport.scan_ids).where(StoredReport.keep)):
            protected_runs.update(int(i) for i in ids or [])
        old = s.execute(select(ClusterScan.id, ClusterScan.run_id)
                        .where(ClusterScan.started_at < cutoff,
                               ClusterScan.pruned_at.is_(None))
                        .order_by(ClusterScan.id)).all()
    targets = [sid for sid, run in old if run not in protected_runs]
    kept = len(old) - len(targets)
    probes = findings = batches = 0
    if dry_run:
        with store.reading() as s:
            for chunk in _chunks(targets, 500):
                probes += s.scalar(select(func.count()).select_from(NodeProbe)
                                   .where(NodeProbe.cluster_scan_id.in_(chunk))) or 0
                findings += s.scalar(select(func.count()).select_from(FindingRow)
                                     .where(FindingRow.cluster_scan_id.in_(chunk),
                                            FindingRow.node.is_not(None))) or 0
        return PruneResult(cutoff=cutoff, scans=len(targets), probes=probes, findings=findings,
                           kept_for_reports=kept, batches=0)
    for chunk in _chunks(targets, 200):
        while True:
            # Bounded deletes: each batch is one short transaction, so scans and readers
            # never wait behind one long delete.
            with store.session() as s:
                ids = list(s.scalars(select(NodeProbe.id)
                                     .where(NodeProbe.cluster_scan_id.in_(chunk))
                                     .limit(batch_size)))
                if ids:
                    s.execute(delete(NodeProbe).where(NodeProbe.id.in_(ids)))
                    probes += len(ids)
                fids = list(s.scalars(select(FindingRow.id).where(
                    FindingRow.cluster_scan_id.in_(chunk), FindingRow.node.is_not(None))
                    .limit(batch_size)))
                if fids:
                    s.execute(delete(FindingRow).where(FindingRow.id.in_(fids)))
                    findings += len(fids)
                if not ids and not fids:
                    s.execute(update(ClusterScan).where(ClusterScan.id.in_(chunk))
                              .values(pruned_at=datetime.now(UTC)))
                    break
            batches += 1
            if progress:
                progress(probes, findings)
    return PruneResult(cutoff=cutoff, scans=len(targets), probes=probes, findings=findings,
                       kept_for_reports=kept, batches=batches)


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
