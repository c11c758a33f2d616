"""Writes scan results to the database and manages its schema (Alembic).

The only module that opens SQLAlchemy sessions. Each cluster's result is written in one
transaction: a failure leaves nothing of that cluster behind and the other clusters unaffected.
"""

from __future__ import annotations

import fcntl
import hashlib
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, case, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from scanner import __version__
from scanner.core.errors import SchemaMismatch, StoreError
from scanner.core.records import (
    FELIX,
    ClusterResult,
    ComponentSnapshot,
    ControlResult,
    NodeResult,
)
from scanner.core.waivers import waiver_json
from scanner.db.models import (
    ClusterScan,
    ControlScan,
    DailyClusterSummary,
    DailyControlSummary,
    FindingRow,
    NodeProbe,
    NodeState,
    RemediationAction,
    ScanRun,
    make_engine,
    normalise_url,
)

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
_PG_MIGRATION_LOCK = 0x46454C49  # "FELI": one key for every felixscan process on the server


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser would read % as interpolation; URLs can hold percent-escapes.
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def redact_url(url: str) -> str:
    """The URL without its password, for messages and reports."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}" if ":" in creds else url


class Fence(Protocol):
    """A held lock that can prove it is still held, inside a transaction (`scanner.db.locks`)."""

    def fence(self, conn: Connection) -> None: ...


class Store:
    """The results database."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = make_engine(url)
        except (SQLAlchemyError, ValueError, ImportError) as exc:
            raise StoreError(f"cannot use database {redact_url(url)}: {exc}") from exc
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema ----------------------------------------------------------------------------

    def head(self) -> str:
        head = ScriptDirectory.from_config(alembic_config(self.url)).get_current_head()
        assert head is not None
        return head

    def current(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except (OperationalError, DBAPIError) as exc:
            raise StoreError(f"cannot reach database {redact_url(self.url)}: "
                             f"{_db_reason(exc)}") from exc

    def upgrade(self) -> tuple[str | None, str]:
        """Upgrade to head; safe when several processes do it at once. Returns (from, to)."""
        script = ScriptDirectory.from_config(alembic_config(self.url))
        before: str | None = None
        try:
            with self.engine.connect() as conn, self._migration_lock(conn):
                before = MigrationContext.configure(conn).get_current_revision()
                if before is not None and before not in {s.revision for s in
                                                         script.walk_revisions()}:
                    raise SchemaMismatch(
                        f"database {redact_url(self.url)} is at revision {before}, which this "
                        f"felixscan ({__version__}) does not know: it was written by a newer "
                        "version. Upgrade felixscan; nothing was changed.")
                cfg = alembic_config(self.url)
                cfg.attributes["connection"] = conn
                if conn.dialect.name == "sqlite":
                    # pysqlite runs DDL outside any transaction, one statement at a time: open
                    # one, so a migration that fails half-way is rolled back as on PostgreSQL.
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                command.upgrade(cfg, "head")
                conn.commit()
                after = MigrationContext.configure(conn).get_current_revision()
        except (OperationalError, DBAPIError) as exc:
            raise StoreError(f"cannot migrate database {redact_url(self.url)}: "
                             f"{_db_reason(exc)}; rolled back, the database stays at revision "
                             f"{before or 'empty'}") from exc
        except StoreError:
            raise
        except Exception as exc:  # a migration script's own error: wrapped, never swallowed
            raise StoreError(f"cannot migrate database {redact_url(self.url)}: a migration "
                             f"failed ({type(exc).__name__}: {exc}); rolled back, the database "
                             f"stays at revision {before or 'empty'}") from exc
        return before, after or ""

    @contextmanager
    def _migration_lock(self, conn: Connection) -> Iterator[None]:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
        else:
            # pysqlite commits each DDL statement on its own, so two processes migrating one
            # file could both see "no schema"; a lock file serialises them. Never a second
            # descriptor on the database itself: closing it would drop SQLite's own POSIX locks
            # in this process and can corrupt the file.
            path = conn.engine.url.database
            if not path or path == ":memory:":
                yield
                return
            digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
            lock_path = Path(tempfile.gettempdir()) / f"felixscan-migrate-{digest}.lock"
            with open(lock_path, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def check_readable(self) -> None:
        """For readers (reports, trends): the schema must be there and not newer than ours."""
        path = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        if path and path != ":memory:" and not Path(path).exists():
            raise StoreError(f"database {redact_url(self.url)} does not exist")
        current = self.current()
        if current is None:
            raise SchemaMismatch(f"database {redact_url(self.url)} holds no felixscan data "
                                 "(no schema); run a scan or `felixscan db upgrade` first")
        script = ScriptDirectory.from_config(alembic_config(self.url))
        if current not in {s.revision for s in script.walk_revisions()}:
            raise SchemaMismatch(f"database {redact_url(self.url)} is at revision {current}, "
                                 f"written by a newer felixscan; upgrade felixscan ({__version__})")
        if current != script.get_current_head():
            raise SchemaMismatch(f"database {redact_url(self.url)} is at revision {current}, "
                                 f"older than this felixscan's {script.get_current_head()}; run "
                                 "`felixscan db upgrade` (nothing was changed)")

    def ensure_schema(self) -> None:
        """Create or upgrade the schema when the database is older; refuse a newer one."""
        current = self.current()
        if current == self.head():
            return
        self.upgrade()

    # --- writing ---------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except SQLAlchemyError as exc:
                session.rollback()
                raise StoreError(f"database write failed ({redact_url(self.url)}): "
                                 f"{_db_reason(exc)}") from exc
            except (TypeError, ValueError) as exc:
                # A value the driver cannot encode (psycopg raises these unwrapped).
                session.rollback()
                raise StoreError(f"database write failed ({redact_url(self.url)}): "
                                 f"a value cannot be stored: {exc}") from exc
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for queries; database failures become StoreError with a clear reason."""
        try:
            with self.sessions() as session:
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"database read failed ({redact_url(self.url)}): "
                             f"{_db_reason(exc)}") from exc

    def begin_run(self, *, trigger: str, started_at: datetime | None = None,
                  vantage: str | None = None) -> int:
        """A new running run; `vantage` names where it probes from (default: this host)."""
        with self.session() as s:
            host = socket.gethostname()
            run = ScanRun(started_at=started_at or datetime.now(UTC), finished_at=None,
                          status="running", trigger=trigger, tool_version=__version__,
                          scanner_host=host, vantage=vantage or host)
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, *, status: str = "finished",
                   finished_at: datetime | None = None, note: str | None = None) -> None:
        """Close the run; `note` says why when it did not finish (None clears an older one)."""
        with self.session() as s:
            s.execute(update(ScanRun).where(ScanRun.id == run_id).values(
                status=status, finished_at=finished_at or datetime.now(UTC), note=note))

    def save_cluster(self, run_id: int, result: ClusterResult, *,
                     lock: Fence | None = None) -> int:
        """Write one cluster's whole result in one transaction; returns its cluster_scans id.

        With `lock` (the cluster's lock, held while it was scanned) the write is fenced: the
        same transaction checks, last, that the lock is still this holder's, and stores nothing
        if not (`scanner.db.locks.LockLost`); a new holder cannot take the lock until it ends.
        None: unfenced, for callers that hold no lock.
        """
        with self.session() as s:
            row = ClusterScan(
                run_id=run_id, cluster=result.cluster, started_at=result.started_at,
                finished_at=result.finished_at, status=result.status, install=result.install,
                declared_enabled=result.declared.enabled if result.declared else None,
                declared_source=result.declared.source if result.declared else None,
                declared_port=result.declared.port if result.declared else None,
                declared_host=result.declared.host if result.declared else None,
                error=result.error,
                nodes_total=len(result.nodes),
                nodes_pass=sum(1 for n in result.nodes if n.verdict == "pass"),
                nodes_fail=sum(1 for n in result.nodes if n.verdict == "fail"),
                nodes_unknown=sum(1 for n in result.nodes if n.verdict == "unknown"),
                nodes_waived=sum(1 for n in result.nodes if n.verdict == "waived"),
                waivers=[waiver_json(w) for w in result.waivers] or None,
                namespace=result.snapshot.namespace if result.snapshot else None,
                daemonset=result.snapshot.daemonset if result.snapshot else None,
                image=result.snapshot.image if result.snapshot else None,
                snapshot=snapshot_summary(result),
                timings={k: round(v, 4) for k, v in result.timings.items()},
            )
            s.add(row)
            s.flush()
            controls = result_controls(result)
            s.execute(insert(ControlScan), [_control_row(row, c) for c in controls])
            ready = {n.name: n.ready for n in result.snapshot.nodes} if result.snapshot else {}
            # Felix's nodes, then the other controls' targets (a pod's node and address).
            probes = [_probe_row(row.id, n, ready.get(n.node), FELIX) for n in result.nodes]
            probes += [_probe_row(row.id, t, ready.get(t.node), c.control)
                       for c in controls if c.control != FELIX for t in c.targets]
            if probes:
                s.execute(insert(NodeProbe), probes)
            findings = [{"cluster_scan_id": row.id, "finding_id": f.id, "severity": f.severity,
                         "node": f.node, "message": f.message, "evidence": dict(f.evidence),
                         "remediation": f.remediation, "waiver": f.waiver,
                         "control": f.control}
                        for f in result.findings]
            if findings:
                s.execute(insert(FindingRow), findings)
            self._roll_up(s, row, result, controls)
            if lock is not None:
                # Last, so that a new holder's takeover waits for no more than the commit.
                lock.fence(s.connection())
            return row.id

    def _roll_up(self, s: Session, row: ClusterScan, result: ClusterResult,
                 controls: tuple[ControlResult, ...]) -> None:
        """Update the day's summaries (the cluster's and each control's) and every Felix
        node's state, in the scan's own transaction.

        Written as upserts whose conditions ignore a scan older than what is already there, so
        scans stored out of order (a late agent) never roll a newer state back.
        """
        upsert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
        when = result.started_at
        day = when.astimezone(UTC).date()
        values = {"cluster": result.cluster, "day": day, "scans": 1,
                  "last_cluster_scan_id": row.id, "last_started_at": when,
                  "status": row.status, "nodes": row.nodes_total, "passing": row.nodes_pass,
                  "failing": row.nodes_fail, "unknown": row.nodes_unknown,
                  "waived": row.nodes_waived}
        stmt = upsert(DailyClusterSummary).values(values)
        t = DailyClusterSummary.__table__.c
        newer = stmt.excluded.last_started_at >= t.last_started_at
        latest = {k: case((newer, getattr(stmt.excluded, k)), else_=getattr(t, k))
                  for k in ("last_cluster_scan_id", "last_started_at", "status", "nodes",
                            "passing", "failing", "unknown", "waived")}
        s.execute(stmt.on_conflict_do_update(index_elements=["cluster", "day"],
                                             set_={"scans": t.scans + 1, **latest}))
        control_stmt = upsert(DailyControlSummary)
        ct = DailyControlSummary.__table__.c
        cx = control_stmt.excluded
        newer_control = cx.last_started_at >= ct.last_started_at
        s.execute(control_stmt.on_conflict_do_update(
            index_elements=["cluster", "control", "day"],
            set_={"scans": ct.scans + 1,
                  **{k: case((newer_control, getattr(cx, k)), else_=getattr(ct, k))
                     for k in ("last_cluster_scan_id", "last_started_at", "status", "targets",
                               "passing", "failing", "unknown", "waived")}}),
            [{"cluster": result.cluster, "control": c.control, "day": day, "scans": 1,
              "last_cluster_scan_id": row.id, "last_started_at": when, "status": c.status,
              "targets": len(c.targets), **_counts(c.targets)} for c in controls])
        if not result.nodes:
            return
        n = NodeState.__table__.c
        node_stmt = upsert(NodeState)
        ex = node_stmt.excluded
        newer_node = ex.last_scan_at >= n.last_scan_at
        same = n.verdict == ex.verdict
        node_stmt = node_stmt.on_conflict_do_update(
            index_elements=["cluster", "node"],
            set_={
                "since": case((newer_node & ~same, ex.since), else_=n.since),
                "streak_scans": case((newer_node & same, n.streak_scans + 1),
                                     (newer_node, 1), else_=n.streak_scans),
                "verdict": case((newer_node, ex.verdict), else_=n.verdict),
                "last_scan_at": case((newer_node, ex.last_scan_at), else_=n.last_scan_at),
                "last_cluster_scan_id": case((newer_node, ex.last_cluster_scan_id),
                                             else_=n.last_cluster_scan_id),
            })
        s.execute(node_stmt, [
            {"cluster": result.cluster, "node": nr.node, "verdict": nr.verdict, "since": when,
             "streak_scans": 1, "first_seen": when, "last_scan_at": when,
             "last_cluster_scan_id": row.id} for nr in result.nodes])

    # --- reading (small helpers; reports have their own queries) ---------------------------

    def cluster_scans(self, run_id: int) -> list[ClusterScan]:
        with self.sessions() as s:
            return list(s.scalars(select(ClusterScan).where(ClusterScan.run_id == run_id)
                                  .order_by(ClusterScan.cluster)))

    # --- remediation actions (scanner.remediate) -------------------------------------------

    def add_remediation(self, **values: Any) -> int:
        """Insert a remediation_actions row (columns as keywords); returns its id."""
        with self.session() as s:
            row = RemediationAction(**values)
            s.add(row)
            s.flush()
            return row.id

    def update_remediation(self, action_id: int, **values: Any) -> None:
        """Update columns of one remediation_actions row, committed at once (a crash later
        still leaves what was already changed in the cluster on record)."""
        with self.session() as s:
            s.execute(update(RemediationAction).where(RemediationAction.id == action_id)
                      .values(**values))

    def remediation(self, action_id: int) -> RemediationAction | None:
        with self.sessions() as s:
            return s.get(RemediationAction, action_id)

    def remediations(self, cluster: str, *, limit: int = 50) -> list[RemediationAction]:
        """The cluster's latest remediation actions, newest first."""
        with self.sessions() as s:
            return list(s.scalars(select(RemediationAction)
                                  .where(RemediationAction.cluster == cluster)
                                  .order_by(RemediationAction.started_at.desc(),
                                            RemediationAction.id.desc())
                                  .limit(limit)))


def result_controls(result: ClusterResult) -> tuple[ControlResult, ...]:
    """The result's controls; for a result without any (an older caller), Felix's alone, made
    of the result's own status, declared state, nodes and findings."""
    if result.controls:
        return result.controls
    snap = result.snapshot
    return (ControlResult(control=FELIX, status=result.status, declared=result.declared,
                          targets=result.nodes, findings=result.findings, error=result.error,
                          installed=True, namespace=snap.namespace if snap else None,
                          workload=snap.daemonset if snap else None,
                          image=snap.image if snap else None),)


def _counts(targets: tuple[NodeResult, ...]) -> dict[str, int]:
    verdicts = [t.verdict for t in targets]
    return {"passing": verdicts.count("pass"), "failing": verdicts.count("fail"),
            "unknown": verdicts.count("unknown"), "waived": verdicts.count("waived")}


def _control_row(scan: ClusterScan, control: ControlResult) -> dict[str, Any]:
    declared, counts = control.declared, _counts(control.targets)
    felix = control.control == FELIX  # where it is, when the control does not say: the scan's
    return {
        "cluster_scan_id": scan.id, "control": control.control,
        "status": control.status, "installed": control.installed,
        "declared_enabled": declared.enabled if declared else None,
        "declared_source": declared.source if declared else None,
        "declared_port": declared.port if declared else None,
        "declared_host": declared.host if declared else None,
        "error": control.error, "targets_total": len(control.targets),
        "targets_pass": counts["passing"], "targets_fail": counts["failing"],
        "targets_unknown": counts["unknown"], "targets_waived": counts["waived"],
        "namespace": control.namespace or (scan.namespace if felix else None),
        "workload": control.workload or (scan.daemonset if felix else None),
        "image": control.image or (scan.image if felix else None),
    }


def _probe_row(cluster_scan_id: int, node: NodeResult, ready: bool | None,
               control: str) -> dict[str, Any]:
    declared, probe = node.declared, node.probe
    tls = probe.tls
    return {
        "cluster_scan_id": cluster_scan_id, "node": node.node, "address": probe.address,
        "port": probe.port, "state": probe.state, "protocol": probe.protocol,
        "felix": probe.felix, "http_status": probe.http_status, "verdict": node.verdict,
        "declared_enabled": declared.enabled, "declared_source": declared.source,
        "pod_current": node.pod_current, "node_ready": ready,
        "tls_version": tls.version if tls else None, "tls_subject": tls.subject if tls else None,
        "tls_issuer": tls.issuer if tls else None,
        "tls_self_signed": tls.self_signed if tls else None,
        "tls_not_after": tls.not_after if tls else None,
        "tls_sha256": tls.sha256 if tls else None, "felix_host": probe.felix_host,
        "error": probe.error, "connect_ms": probe.connect_ms, "duration_ms": probe.duration_ms,
        "addresses": [{"address": p.address, "state": p.state, "protocol": p.protocol,
                       "felix": p.felix, "error": p.error} for p in node.probes]
        if len(node.probes) > 1 else None,
        "declared_host": declared.host,
        "node_view": node.view.as_json() if node.view else None,
        "control": control, "pod": declared.pod,
    }


def snapshot_summary(result: ClusterResult) -> dict[str, Any]:
    """The evidence of the snapshot worth keeping: never a Secret value, never credentials."""
    snap = result.snapshot
    if snap is None:
        return {}
    r = snap.rollout
    return {
        "namespace": snap.namespace, "daemonset": snap.daemonset, "container": snap.container,
        "image": snap.image, "felix_crd": snap.felix_crd,
        "rollout": {"generation": r.generation, "observed_generation": r.observed_generation,
                    "desired": r.desired, "updated": r.updated, "ready": r.ready,
                    "available": r.available, "current_revision": r.current_revision,
                    "strategy": r.strategy, "max_unavailable": r.max_unavailable,
                    "complete": r.complete},
        "env": [{"name": e.name, "value": "<redacted>" if e.redacted else e.value,
                 "origin": e.origin, "error": e.error} for e in snap.env],
        "config_file": {"known": snap.config_file.known, "origin": snap.config_file.origin,
                        "values": dict(snap.config_file.values)},
        "felix_group": snap.felix_group,
        "felix_configurations": [
            {"name": c.name, **{k: v for k, v in c.spec.items()},
             "annotations": dict(c.annotations), "nodeSelector": c.node_selector,
             "created": c.created}
            for c in snap.felix_configs],
        "felix_configuration_errors": {g: s.error for g, s in snap.felix_sets.items()
                                       if s.error},
        "installation": {"name": snap.installation.name,
                         "nodeMetricsPort": snap.installation.node_metrics_port}
        if snap.installation else None,
        "pods": len(snap.pods), "nodes": len(snap.nodes),
        "daemonsets": sorted({p.owner or "(none)" for p in snap.pods}),
        "probe": dict(result.method),
        "declared": {"enabled": result.declared.enabled, "source": result.declared.source,
                     "port": result.declared.port, "port_source": result.declared.port_source,
                     "tls": result.declared.tls, "reason": result.declared.reason,
                     "host": result.declared.host, "client_auth": result.declared.client_auth,
                     "felix_version": result.declared.felix_version}
        if result.declared else None,
        **({"components": {c: _component_summary(comp) for c, comp in snap.components.items()}}
           if snap.components else {}),
    }


def _component_summary(comp: ComponentSnapshot) -> dict[str, Any]:
    """A Typha or kube-controllers Deployment as read: where, how many, which pods where (no
    env: its values are in the control's declared state, never a Secret's)."""
    kcc = comp.kcc
    return {
        "namespace": comp.namespace, "deployment": comp.deployment,
        "container": comp.container, "found": comp.found, "image": comp.image,
        "replicas": comp.replicas, "ready_replicas": comp.ready_replicas,
        "pods": [{"name": p.name, "node": p.node, "ip": p.pod_ip,
                  "host_network": p.host_network, "phase": p.phase, "ready": p.ready}
                 for p in comp.pods],
        "kcc": {"exists": kcc.exists, "port": _json_scalar(kcc.port), "error": kcc.error,
                "resource_version": kcc.resource_version} if kcc else None,
        "error": comp.error,
    }


def _json_scalar(value: object) -> object:
    """A value as served (any JSON), kept when it is a plain scalar, else as its text."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _db_reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    reason = str(orig or exc).strip().splitlines()
    return reason[0] if reason else type(exc).__name__
