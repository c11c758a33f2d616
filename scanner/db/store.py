"""Writes scan results to the database and manages its schema (Alembic).

The only module that opens SQLAlchemy sessions. Each cluster's result is written in one
transaction: a failure leaves nothing of that cluster behind and the other clusters unaffected.

A cluster's rows are written with SQLAlchemy Core, their values converted once, up front, to
what the driver stores (`_Encode`): the node probes and findings with one executemany on SQLite
and one `COPY` on PostgreSQL, the node states with one multi-row upsert. Alembic is imported
only to migrate: a database already at `SCHEMA_REVISION` is recognised with plain SQL.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection, case, insert, select, text, update
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
    SCHEMA_REVISION,
    ClusterScan,
    ControlScan,
    DailyClusterSummary,
    DailyControlSummary,
    NodeProbe,
    RemediationAction,
    ScanRun,
    make_engine,
    normalise_url,
)

if TYPE_CHECKING:
    from alembic.config import Config

_WEB_PROTOCOLS = ("http", "https")
MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
_PG_MIGRATION_LOCK = 0x46454C49  # "FELI": one key for every felixscan process on the server


def alembic_config(url: str) -> Config:
    from alembic.config import Config

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
        """The newest revision of the migrations (Alembic's answer; `SCHEMA_REVISION` says
        the same without reading them)."""
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(alembic_config(self.url)).get_current_head()
        assert head is not None
        return head

    def current(self) -> str | None:
        """The database's revision (None: no schema), read with plain SQL."""
        try:
            with self.engine.connect() as conn:
                return _stored_revision(conn)
        except (OperationalError, DBAPIError) as exc:
            raise StoreError(f"cannot reach database {redact_url(self.url)}: "
                             f"{_db_reason(exc)}") from exc

    def upgrade(self) -> tuple[str | None, str]:
        """Upgrade to head; safe when several processes do it at once. Returns (from, to)."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

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
        if current == SCHEMA_REVISION:
            return
        if current is None:
            raise SchemaMismatch(f"database {redact_url(self.url)} holds no felixscan data "
                                 "(no schema); run a scan or `felixscan db upgrade` first")
        from alembic.script import ScriptDirectory

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
        if self.current() == SCHEMA_REVISION:
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

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One transaction on a connection, failures as `session()` reports them."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"database write failed ({redact_url(self.url)}): "
                             f"{_db_reason(exc)}") from exc
        except (TypeError, ValueError) as exc:
            raise StoreError(f"database write failed ({redact_url(self.url)}): "
                             f"a value cannot be stored: {exc}") from exc

    def save_cluster(self, run_id: int, result: ClusterResult, *,
                     lock: Fence | None = None) -> int:
        """Write one cluster's whole result in one transaction; returns its cluster_scans id.

        With `lock` (the cluster's lock, held while it was scanned) the write is fenced: the
        same transaction checks, last, that the lock is still this holder's, and stores nothing
        if not (`scanner.db.locks.LockLost`); a new holder cannot take the lock until it ends.
        None: unfenced, for callers that hold no lock.
        """
        controls = result_controls(result)
        scan = _cluster_row(run_id, result)
        with self._writing() as conn:
            enc = _Encode(conn.dialect.name)
            # Every value converted before the first statement: a value the database cannot
            # take fails here, with nothing sent.
            ready = {n.name: n.ready for n in result.snapshot.nodes} if result.snapshot else {}
            probes = [_probe_values(enc, n, ready.get(n.node), FELIX) for n in result.nodes]
            probes += [_probe_values(enc, t, ready.get(t.node), c.control)
                       for c in controls if c.control != FELIX for t in c.targets]
            findings = [(f.id, f.severity, f.node, f.message,
                         enc.json(dict(f.evidence)), f.remediation, f.waiver, f.control)
                        for f in result.findings]
            key = conn.execute(insert(ClusterScan), scan).inserted_primary_key
            assert key is not None
            scan_id: int = key[0]
            conn.execute(insert(ControlScan), [_control_row(scan_id, scan, c) for c in controls])
            _insert_rows(conn, "node_probes", PROBE_COLUMNS, scan_id, probes)
            _insert_rows(conn, "findings", FINDING_COLUMNS, scan_id, findings)
            self._roll_up(conn, enc, scan_id=scan_id, scan=scan, result=result, controls=controls)
            if lock is not None:
                # Last, so that a new holder's takeover waits for no more than the commit.
                lock.fence(conn)
            return scan_id

    def _roll_up(self, conn: Connection, enc: _Encode, *, scan_id: int, scan: dict[str, Any],
                 result: ClusterResult, controls: tuple[ControlResult, ...]) -> None:
        """Update the day's summaries (the cluster's and each control's) and every Felix
        node's state, in the scan's own transaction.

        Written as upserts whose conditions ignore a scan older than what is already there, so
        scans stored out of order (a late agent) never roll a newer state back.
        """
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert
            upsert: Callable[..., Any] = pg_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert
            upsert = sqlite_insert
        when = result.started_at
        day = when.astimezone(UTC).date()
        values = {"cluster": result.cluster, "day": day, "scans": 1,
                  "last_cluster_scan_id": scan_id, "last_started_at": when,
                  "status": scan["status"], "nodes": scan["nodes_total"],
                  "passing": scan["nodes_pass"], "failing": scan["nodes_fail"],
                  "unknown": scan["nodes_unknown"], "waived": scan["nodes_waived"]}
        stmt = upsert(DailyClusterSummary).values(values)
        t = DailyClusterSummary.__table__.c
        newer = stmt.excluded.last_started_at >= t.last_started_at
        latest = {k: case((newer, getattr(stmt.excluded, k)), else_=getattr(t, k))
                  for k in ("last_cluster_scan_id", "last_started_at", "status", "nodes",
                            "passing", "failing", "unknown", "waived")}
        conn.execute(stmt.on_conflict_do_update(index_elements=["cluster", "day"],
                                                set_={"scans": t.scans + 1, **latest}))
        control_stmt = upsert(DailyControlSummary)
        ct = DailyControlSummary.__table__.c
        cx = control_stmt.excluded
        newer_control = cx.last_started_at >= ct.last_started_at
        conn.execute(control_stmt.on_conflict_do_update(
            index_elements=["cluster", "control", "day"],
            set_={"scans": ct.scans + 1,
                  **{k: case((newer_control, getattr(cx, k)), else_=getattr(ct, k))
                     for k in ("last_cluster_scan_id", "last_started_at", "status", "targets",
                               "passing", "failing", "unknown", "waived")}}),
            [{"cluster": result.cluster, "control": c.control, "day": day, "scans": 1,
              "last_cluster_scan_id": scan_id, "last_started_at": when, "status": c.status,
              "targets": len(c.targets), **_counts(c.targets)} for c in controls])
        _upsert_node_states(conn, result.cluster, enc.ts(when), scan_id,
                            [(n.node, n.verdict) for n in result.nodes])

    # --- reading (small helpers; reports have their own queries) ---------------------------

    def cluster_scans(self, run_id: int) -> list[ClusterScan]:
        with self.sessions() as s:
            return list(s.scalars(select(ClusterScan).where(ClusterScan.run_id == run_id)
                                  .order_by(ClusterScan.cluster)))

    def last_protocols(self, cluster: str) -> dict[tuple[str, int], str]:
        """For the cluster's latest stored scan, the protocol ("http", "https") each
        (address, port) of Felix's metrics endpoint answered with: its open probes only (with
        the other open addresses of a node probed on more than one). One query, on the indexes
        of cluster_scans (cluster, started_at) and node_probes (cluster_scan_id, ...)."""
        latest = (select(ClusterScan.id).where(ClusterScan.cluster == cluster)
                  .order_by(ClusterScan.started_at.desc(), ClusterScan.id.desc()).limit(1)
                  .scalar_subquery())
        p = NodeProbe.__table__.c
        stmt = (select(p.address, p.port, p.protocol, p.addresses)
                .where(p.cluster_scan_id == latest, p.control == FELIX, p.state == "open"))
        found: dict[tuple[str, int], str] = {}
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
        except SQLAlchemyError as exc:
            raise StoreError(f"database read failed ({redact_url(self.url)}): "
                             f"{_db_reason(exc)}") from exc
        for address, port, protocol, addresses in rows:
            for probe in addresses or ():
                if (probe.get("state") == "open" and probe.get("address")
                        and probe.get("protocol") in _WEB_PROTOCOLS):
                    found[(probe["address"], port)] = probe["protocol"]
            if address and protocol in _WEB_PROTOCOLS:
                found[(address, port)] = protocol
        return found

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


def _cluster_row(run_id: int, result: ClusterResult) -> dict[str, Any]:
    declared, snap = result.declared, result.snapshot
    counts = _counts(result.nodes)
    return {
        "run_id": run_id, "cluster": result.cluster, "started_at": result.started_at,
        "finished_at": result.finished_at, "status": result.status, "install": result.install,
        "declared_enabled": declared.enabled if declared else None,
        "declared_source": declared.source if declared else None,
        "declared_port": declared.port if declared else None,
        "declared_host": declared.host if declared else None,
        "error": result.error, "nodes_total": len(result.nodes),
        "nodes_pass": counts["passing"], "nodes_fail": counts["failing"],
        "nodes_unknown": counts["unknown"], "nodes_waived": counts["waived"],
        "waivers": [waiver_json(w) for w in result.waivers] or None,
        "namespace": snap.namespace if snap else None,
        "daemonset": snap.daemonset if snap else None,
        "image": snap.image if snap else None,
        "snapshot": snapshot_summary(result),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "pruned_at": None,
    }


def _control_row(scan_id: int, scan: dict[str, Any], control: ControlResult) -> dict[str, Any]:
    declared, counts = control.declared, _counts(control.targets)
    felix = control.control == FELIX  # where it is, when the control does not say: the scan's
    return {
        "cluster_scan_id": scan_id, "control": control.control,
        "status": control.status, "installed": control.installed,
        "declared_enabled": declared.enabled if declared else None,
        "declared_source": declared.source if declared else None,
        "declared_port": declared.port if declared else None,
        "declared_host": declared.host if declared else None,
        "error": control.error, "targets_total": len(control.targets),
        "targets_pass": counts["passing"], "targets_fail": counts["failing"],
        "targets_unknown": counts["unknown"], "targets_waived": counts["waived"],
        "namespace": control.namespace or (scan["namespace"] if felix else None),
        "workload": control.workload or (scan["daemonset"] if felix else None),
        "image": control.image or (scan["image"] if felix else None),
    }


class _Encode:
    """Values as the driver stores them, converted once per value without SQLAlchemy's
    per-row type processing, exactly as the models' types would (`UTCDateTime`, `JSON`):
    SQLite keeps a UTC timestamp as naive text `YYYY-MM-DD HH:MM:SS.ffffff`, PostgreSQL an
    aware datetime; JSON is `json.dumps` text, and None in a JSON column the JSON `null`."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"

    def ts(self, value: datetime | None) -> datetime | str | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None).isoformat(" ", "microseconds") if self.sqlite \
            else value

    @staticmethod
    def json(value: object) -> str:
        return _JSON_NULL if value is None else json.dumps(value)


_JSON_NULL = "null"  # what the JSON type stores for None (its none_as_null is off)


# The node_probes columns written for a cluster scan, after cluster_scan_id, in order.
PROBE_COLUMNS = (
    "node", "address", "port", "state", "protocol", "felix", "http_status", "verdict",
    "declared_enabled", "declared_source", "pod_current", "node_ready", "tls_version",
    "tls_subject", "tls_issuer", "tls_self_signed", "tls_not_after", "tls_sha256",
    "felix_host", "error", "connect_ms", "duration_ms", "addresses", "declared_host",
    "node_view", "control", "pod",
)
FINDING_COLUMNS = ("finding_id", "severity", "node", "message", "evidence", "remediation",
                   "waiver", "control")


def _probe_values(enc: _Encode, node: NodeResult, ready: bool | None,
                  control: str) -> tuple[Any, ...]:
    declared, probe = node.declared, node.probe
    tls = probe.tls
    addresses = _JSON_NULL if len(node.probes) < 2 else enc.json(
        [{"address": p.address, "state": p.state, "protocol": p.protocol, "felix": p.felix,
          "error": p.error} for p in node.probes])
    view = _JSON_NULL if node.view is None else enc.json(node.view.as_json())
    if tls is None:
        return (node.node, probe.address, probe.port, probe.state, probe.protocol, probe.felix,
                probe.http_status, node.verdict, declared.enabled, declared.source,
                node.pod_current, ready, None, None, None, None, None, None, probe.felix_host,
                probe.error, probe.connect_ms, probe.duration_ms, addresses, declared.host,
                view, control, declared.pod)
    return (node.node, probe.address, probe.port, probe.state, probe.protocol, probe.felix,
            probe.http_status, node.verdict, declared.enabled, declared.source,
            node.pod_current, ready, tls.version, tls.subject, tls.issuer, tls.self_signed,
            enc.ts(tls.not_after), tls.sha256, probe.felix_host, probe.error, probe.connect_ms,
            probe.duration_ms, addresses, declared.host, view, control, declared.pod)


def _insert_rows(conn: Connection, table: str, columns: Sequence[str], scan_id: int,
                 rows: list[tuple[Any, ...]]) -> None:
    """Append rows of converted values (in `columns` order) to a cluster scan's child table:
    one executemany on SQLite, one COPY on PostgreSQL, in the caller's transaction."""
    if not rows:
        return
    names = ", ".join(("cluster_scan_id", *columns))
    if conn.dialect.name == "postgresql":
        _copy(conn, f"COPY {table} ({names}) FROM STDIN", ((scan_id, *r) for r in rows))
        return
    marks = ", ".join("?" * (len(columns) + 1))
    conn.exec_driver_sql(f"INSERT INTO {table} ({names}) VALUES ({marks})",  # noqa: S608
                         [(scan_id, *r) for r in rows])


def _copy(conn: Connection, statement: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """COPY FROM STDIN through psycopg, on the connection (and transaction) SQLAlchemy holds;
    a driver error becomes SQLAlchemy's, and a lost connection is invalidated, as for any
    other statement."""
    fairy = conn.connection
    driver = fairy.driver_connection
    dbapi = conn.dialect.loaded_dbapi
    assert driver is not None
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, fairy.dbapi_connection, None)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(statement, None, exc, dbapi.Error,
                                  connection_invalidated=lost) from exc


# A node's state moves to the newest scan's verdict; a scan older than the state changes
# nothing. The SET expressions read the row as it was before the update.
_NEWER = "excluded.last_scan_at >= node_states.last_scan_at"
_NODE_STATES_SET = (
    "ON CONFLICT (cluster, node) DO UPDATE SET "
    f"since = CASE WHEN {_NEWER} AND node_states.verdict <> excluded.verdict "
    "THEN excluded.since ELSE node_states.since END, "
    f"streak_scans = CASE WHEN {_NEWER} AND node_states.verdict = excluded.verdict "
    f"THEN node_states.streak_scans + 1 WHEN {_NEWER} THEN 1 ELSE node_states.streak_scans END, "
    f"verdict = CASE WHEN {_NEWER} THEN excluded.verdict ELSE node_states.verdict END, "
    f"last_scan_at = CASE WHEN {_NEWER} THEN excluded.last_scan_at "
    "ELSE node_states.last_scan_at END, "
    f"last_cluster_scan_id = CASE WHEN {_NEWER} THEN excluded.last_cluster_scan_id "
    "ELSE node_states.last_cluster_scan_id END")
_NODE_STATES_INTO = ("INSERT INTO node_states (cluster, node, verdict, since, streak_scans, "
                     "first_seen, last_scan_at, last_cluster_scan_id) ")
_SQLITE_CHUNK = 10_000  # nodes per statement: 2 parameters each, under SQLite's 32,766


def _upsert_node_states(conn: Connection, cluster: str, when: object,
                        scan_id: int, nodes: list[tuple[str, str]]) -> None:
    """Every (node, verdict) of a cluster scan into node_states: one multi-row upsert (on
    SQLite one per 10,000 nodes). A node named twice is written in a second statement, as a
    second scan would write it."""
    rounds: list[list[tuple[str, str]]] = []
    seen: dict[str, int] = {}
    for node, verdict in nodes:
        n = seen.get(node, 0)
        seen[node] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append((node, verdict))
    for batch in rounds:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                _NODE_STATES_INTO + "SELECT %(cluster)s, n.node, n.verdict, %(when)s, 1, "
                "%(when)s, %(when)s, %(scan)s "
                "FROM unnest(%(nodes)s::text[], %(verdicts)s::text[]) AS n(node, verdict) "
                "WHERE true " + _NODE_STATES_SET,
                {"cluster": cluster, "when": when, "scan": scan_id,
                 "nodes": [b[0] for b in batch], "verdicts": [b[1] for b in batch]})
            continue
        for i in range(0, len(batch), _SQLITE_CHUNK):
            part = batch[i:i + _SQLITE_CHUNK]
            rows = ", ".join(["(?, ?)"] * len(part))
            conn.exec_driver_sql(
                f"{_NODE_STATES_INTO}SELECT ?, column1, column2, ?, 1, ?, ?, ? "  # noqa: S608
                f"FROM (VALUES {rows}) WHERE true {_NODE_STATES_SET}",
                (cluster, when, when, when, scan_id, *(v for pair in part for v in pair)))


def _stored_revision(conn: Connection) -> str | None:
    """The database's Alembic revision, None when it has no schema; plain SQL, no Alembic
    (which is asked only when the table holds more than one revision, to say why)."""
    if conn.dialect.name == "sqlite":
        exists = conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                      "AND name = 'alembic_version'").first() is not None
    else:
        exists = conn.exec_driver_sql("SELECT to_regclass('alembic_version')").scalar() \
            is not None
    if not exists:
        return None
    revisions = [r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")]
    if len(revisions) > 1:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision()
    return revisions[0] if revisions else None


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
