"""Bookkeeping rows in `scan_runs`: skipped runs, runs aborted at shutdown, and runs whose
process is gone.

Part of the store layer (with `scanner.db.store`, which writes the scans themselves). Each function
is one transaction per row, so a crash leaves either the whole row or nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import func, select, update

from scanner import __version__
from scanner.db.locks import RUN_LOCK_PREFIX, DatabaseLock
from scanner.db.models import ClusterScan, Lease, ScanRun
from scanner.db.store import Store

log = logging.getLogger(__name__)

SKIPPED = "skipped"
ABORTED = "aborted"


def record_skipped(store: Store, *, trigger: str, at: datetime | None = None,
                   cluster: str | None = None, note: str | None = None) -> int:
    """A run that was due but did not start (overlap, another replica's lock); returns its id.

    The row names the cluster and the reason, so the gap is visible to anyone counting runs.
    """
    when = at or datetime.now(UTC)
    with store.session() as s:
        run = ScanRun(started_at=when, finished_at=when, status=SKIPPED, trigger=trigger,
                      tool_version=__version__, scanner_host=socket.gethostname(),
                      cluster=cluster, note=note)
        s.add(run)
        s.flush()
        return run.id


def abort_runs(store: Store, run_ids: Iterable[int], *, at: datetime | None = None) -> list[int]:
    """Mark those of `run_ids` that are still running as aborted; returns the ids it marked.

    A cluster result is written in one transaction with the scan, so an aborted run holds the
    clusters it finished and nothing of the one it was in the middle of.
    """
    ids = sorted(set(run_ids))
    if not ids:
        return []
    when = at or datetime.now(UTC)
    with store.session() as s:
        marked = list(s.scalars(select(ScanRun.id).where(ScanRun.id.in_(ids),
                                                         ScanRun.status == "running")))
        if marked:
            s.execute(update(ScanRun).where(ScanRun.id.in_(marked),
                                            ScanRun.status == "running")
                      .values(status=ABORTED, finished_at=when))
    return marked


def reconcile_runs(store: Store, locks: DatabaseLock, *, at: datetime | None = None) -> list[int]:
    """Mark `running` runs whose process is gone as aborted, with a note saying who ran them
    and how that is known; returns their ids.

    A run holds the lock `run:<id>` while it runs (`scanner.scan.run_scan`). Its process is gone
    when that lock is: a process of this machine that no longer exists, an expired lease (on
    SQLite, any host), a PostgreSQL session that ended. The dead holder's row is removed (also
    for a run that was closed but could not give its lock back). A run holding no such lock
    (in the instant before it took it) is left as it is. Clusters the run stored before its
    end stay; the one it was in the middle of was never stored.
    """
    with store.reading() as s:
        names = list(s.scalars(select(Lease.name).where(Lease.name.like(f"{RUN_LOCK_PREFIX}%"))
                               .order_by(Lease.name)))
    marked: list[int] = []
    for name in names:
        found = locks.lookup(name)
        if found is None or found.gone is None:
            continue
        run_id = int(name.removeprefix(RUN_LOCK_PREFIX))
        since = (f", running since {found.since.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
                 if found.since else "")
        note = (f"aborted: the felixscan that ran it ({found.who}{since}) is gone: "
                f"{found.gone}; found by pid {os.getpid()} on {socket.gethostname()}")
        with store.session() as s:
            running = s.scalar(select(ScanRun.id).where(ScanRun.id == run_id,
                                                        ScanRun.status == "running"))
            if running is not None:
                s.execute(update(ScanRun).where(ScanRun.id == run_id,
                                                ScanRun.status == "running")
                          .values(status=ABORTED, finished_at=at or datetime.now(UTC),
                                  note=note))
        locks.clear(found)
        if running is not None:
            log.warning("scan run %d %s", run_id, note)
            marked.append(run_id)
    return marked


def last_scan_started(store: Store, cluster: str) -> datetime | None:
    """When the cluster's newest stored scan started (any trigger, any replica)."""
    with store.sessions() as s:
        return s.scalar(select(func.max(ClusterScan.started_at))
                        .where(ClusterScan.cluster == cluster))


def previous_status(store: Store, cluster: str, *, before: datetime) -> str | None:
    """The status of the cluster's last scan started before `before` that was not an error.

    An error says nothing about compliance, so alerts compare with the last real verdict.
    """
    with store.sessions() as s:
        return s.scalar(select(ClusterScan.status)
                        .where(ClusterScan.cluster == cluster, ClusterScan.started_at < before,
                               ClusterScan.status != "error")
                        .order_by(ClusterScan.started_at.desc(), ClusterScan.id.desc())
                        .limit(1))
