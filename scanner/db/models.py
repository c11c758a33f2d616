"""The results database: SQLAlchemy 2 typed models and the engine factory.

The schema itself is created only by the Alembic migrations in `migrations/`; a test fails when
these models and the migrations drift apart.

Naming rule, rows vs records: a class here is an ORM *row*, named in the singular for one row of
its table (`ClusterScan` is a `cluster_scans` row, `FindingRow` a `findings` row); rows are
mutable, belong to a session, and are written only inside `scanner.db`. A row read outside it
(`Store.remediation`) is detached and only read. Everything that crosses a layer is an immutable
*record*, a frozen dataclass named for what it describes, never with the suffix `Row`: the
pipeline's records in `scanner.core.records` (`...Snapshot`, `...Result`, `...Target`) and the
query results of `scanner.db.queries` (`...Report`, `...Page`, `...Point`, `...Entry`, `...Item`).
A column keeps the name of the setting or record field it stores.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from scanner.core.records import FELIX

# The revision of the newest migration in `migrations/versions`, which these models describe.
# `Store.ensure_schema` compares the database's `alembic_version` with it without importing
# Alembic; a test fails when a new migration is added and this is not moved to it.
SCHEMA_REVISION = "0008"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite has no BIGINT autoincrement; rows that grow with nodes x days get 64-bit keys elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on SQLite (which stores naive text) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(),
                                                     dict[str, Any]: JSON()}


class ScanRun(Base):
    """One invocation of a scan (CLI, scheduler, remediation check), over one or more clusters."""

    __tablename__ = "scan_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16))  # running, finished, aborted
    trigger: Mapped[str] = mapped_column(String(32))  # cli, schedule, demo, remediation
    tool_version: Mapped[str] = mapped_column(String(64))
    scanner_host: Mapped[str] = mapped_column(String(255))  # the host the probes came from
    # where the probes came from, by name (`vantage`, `--vantage`): e.g. corp-network for a
    # serve outside the clusters, pod-network for the in-cluster agent; None: scanner_host
    vantage: Mapped[str | None] = mapped_column(String(255))
    cluster: Mapped[str | None] = mapped_column(String(255))  # set on skipped runs
    note: Mapped[str | None] = mapped_column(Text)  # why a run was skipped or aborted

    clusters: Mapped[list[ClusterScan]] = relationship(back_populates="run")

    __table_args__ = (Index("ix_scan_runs_started_at", "started_at"),)


class ClusterScan(Base):
    """One cluster's result in one run: the snapshot summary, its status and counts."""

    __tablename__ = "cluster_scans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("scan_runs.id", ondelete="CASCADE"))
    cluster: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))  # compliant, non_compliant, error
    install: Mapped[str] = mapped_column(String(16))
    declared_enabled: Mapped[bool | None] = mapped_column(Boolean)
    declared_source: Mapped[str | None] = mapped_column(Text)
    declared_port: Mapped[int | None] = mapped_column(Integer)
    declared_host: Mapped[str | None] = mapped_column(String(255))  # "" = every interface
    error: Mapped[str | None] = mapped_column(Text)
    nodes_total: Mapped[int] = mapped_column(Integer, default=0)
    nodes_pass: Mapped[int] = mapped_column(Integer, default=0)
    nodes_fail: Mapped[int] = mapped_column(Integer, default=0)
    nodes_unknown: Mapped[int] = mapped_column(Integer, default=0)
    # failing nodes whose risk a waiver in force accepts (verdict `waived`), and those waivers
    nodes_waived: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    waivers: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    namespace: Mapped[str | None] = mapped_column(String(255))
    daemonset: Mapped[str | None] = mapped_column(String(255))
    image: Mapped[str | None] = mapped_column(Text)
    # Rollout counts, env and FelixConfiguration facts, probe settings: evidence for reports.
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    pruned_at: Mapped[datetime | None]  # when retention removed its node probes

    run: Mapped[ScanRun] = relationship(back_populates="clusters")
    probes: Mapped[list[NodeProbe]] = relationship(back_populates="cluster_scan",
                                                   cascade="all, delete-orphan")
    findings: Mapped[list[FindingRow]] = relationship(back_populates="cluster_scan",
                                                      cascade="all, delete-orphan")
    controls: Mapped[list[ControlScan]] = relationship(back_populates="cluster_scan",
                                                       cascade="all, delete-orphan")

    __table_args__ = (
        Index("ix_cluster_scans_cluster_started_at", "cluster", "started_at"),
        Index("ix_cluster_scans_started_at", "started_at"),
        Index("ix_cluster_scans_run_id", "run_id"),
    )


class ControlScan(Base):
    """One control's result in one cluster scan (`felix-metrics`, `typha-metrics`,
    `kube-controllers-metrics`): its status, declared state and target counts.

    Every cluster scan has one per control it checked; those stored before the control
    catalogue (revision 0008) have their felix-metrics row, copied from the cluster scan.
    """

    __tablename__ = "control_scans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_scan_id: Mapped[int] = mapped_column(
        ForeignKey("cluster_scans.id", ondelete="CASCADE"))
    control: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # compliant, non_compliant, error
    installed: Mapped[bool] = mapped_column(Boolean, default=True)  # False: not deployed
    declared_enabled: Mapped[bool | None] = mapped_column(Boolean)
    declared_source: Mapped[str | None] = mapped_column(Text)
    declared_port: Mapped[int | None] = mapped_column(Integer)
    declared_host: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    targets_total: Mapped[int] = mapped_column(Integer, default=0)
    targets_pass: Mapped[int] = mapped_column(Integer, default=0)
    targets_fail: Mapped[int] = mapped_column(Integer, default=0)
    targets_unknown: Mapped[int] = mapped_column(Integer, default=0)
    targets_waived: Mapped[int] = mapped_column(Integer, default=0)
    namespace: Mapped[str | None] = mapped_column(String(255))
    workload: Mapped[str | None] = mapped_column(String(255))  # DaemonSet or Deployment
    image: Mapped[str | None] = mapped_column(Text)

    cluster_scan: Mapped[ClusterScan] = relationship(back_populates="controls")

    __table_args__ = (
        UniqueConstraint("cluster_scan_id", "control"),
        Index("ix_control_scans_cluster_scan_id", "cluster_scan_id"),
    )


# The partial index of the node probes of controls other than Felix's (written as a literal,
# so that SQLite's planner can match a query's own `control <> 'felix-metrics'` to it).
OTHER_CONTROLS = text(f"control <> '{FELIX}'")


class NodeProbe(Base):
    """One node (and port) probed in one cluster scan, with its declared state and verdict.

    `control` says whose endpoint: Felix's rows are one per node; for Typha and
    kube-controllers a row is one target, `node` the node its pod runs on and `pod` the pod.
    Rows stored before revision 0008 are Felix's.
    """

    __tablename__ = "node_probes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    cluster_scan_id: Mapped[int] = mapped_column(
        ForeignKey("cluster_scans.id", ondelete="CASCADE"))
    node: Mapped[str] = mapped_column(String(253))
    address: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    protocol: Mapped[str | None] = mapped_column(String(8))
    felix: Mapped[bool | None] = mapped_column(Boolean)
    http_status: Mapped[int | None] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(8))
    declared_enabled: Mapped[bool | None] = mapped_column(Boolean)
    declared_source: Mapped[str | None] = mapped_column(Text)
    pod_current: Mapped[bool | None] = mapped_column(Boolean)
    node_ready: Mapped[bool | None] = mapped_column(Boolean)
    tls_version: Mapped[str | None] = mapped_column(String(16))
    tls_subject: Mapped[str | None] = mapped_column(Text)
    tls_issuer: Mapped[str | None] = mapped_column(Text)
    tls_self_signed: Mapped[bool | None] = mapped_column(Boolean)
    tls_not_after: Mapped[datetime | None]
    tls_sha256: Mapped[str | None] = mapped_column(String(64))
    felix_host: Mapped[str | None] = mapped_column(String(253))
    error: Mapped[str | None] = mapped_column(Text)
    connect_ms: Mapped[float | None] = mapped_column(Float)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    # Every address probed on the port when the node has more than one (both families), each
    # {address, state, protocol, felix, error}; the columns above hold the one that decided.
    addresses: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    node_view: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # node-check's, if read
    declared_host: Mapped[str | None] = mapped_column(String(255))
    control: Mapped[str] = mapped_column(String(32), default=FELIX, server_default=FELIX)
    pod: Mapped[str | None] = mapped_column(String(253))  # the pod whose spec decided it

    cluster_scan: Mapped[ClusterScan] = relationship(back_populates="probes")

    __table_args__ = (
        # Probes are appended in cluster_scan_id order, so this index grows at its end; an index
        # on the node name alone was a random insert per probe and slowed big databases down.
        Index("ix_node_probes_cluster_scan_id_node", "cluster_scan_id", "node"),
        Index("ix_node_probes_other_controls", "cluster_scan_id", "control",
              sqlite_where=OTHER_CONTROLS, postgresql_where=OTHER_CONTROLS),
    )


class FindingRow(Base):
    """A finding of one cluster scan, with its stable ID, evidence and remediation text."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    cluster_scan_id: Mapped[int] = mapped_column(
        ForeignKey("cluster_scans.id", ondelete="CASCADE"))
    finding_id: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    node: Mapped[str | None] = mapped_column(String(253))
    message: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    remediation: Mapped[str] = mapped_column(Text, default="")
    waiver: Mapped[str | None] = mapped_column(String(64))  # the waiver that accepts it
    control: Mapped[str] = mapped_column(String(32), default=FELIX, server_default=FELIX)

    cluster_scan: Mapped[ClusterScan] = relationship(back_populates="findings")

    __table_args__ = (
        Index("ix_findings_cluster_scan_id", "cluster_scan_id"),
        Index("ix_findings_finding_id", "finding_id"),
    )


class DailyClusterSummary(Base):
    """The rollup written with every cluster scan: one row per cluster and UTC day.

    The day's last scan decides its figures; trend queries read only this table, so they cost
    O(clusters x days), never O(probes).
    """

    __tablename__ = "daily_cluster_summary"

    cluster: Mapped[str] = mapped_column(String(255), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    scans: Mapped[int] = mapped_column(Integer)  # cluster scans that day
    last_cluster_scan_id: Mapped[int] = mapped_column(Integer)
    last_started_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))
    nodes: Mapped[int] = mapped_column(Integer)
    passing: Mapped[int] = mapped_column(Integer)
    failing: Mapped[int] = mapped_column(Integer)
    unknown: Mapped[int] = mapped_column(Integer)
    waived: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (Index("ix_daily_cluster_summary_day", "day"),)


class DailyControlSummary(Base):
    """The per-control rollup written with every cluster scan: one row per cluster, control
    and UTC day, the day's last scan that checked the control deciding its figures (its
    targets: Felix's nodes, Typha's and kube-controllers' pods)."""

    __tablename__ = "daily_control_summary"

    cluster: Mapped[str] = mapped_column(String(255), primary_key=True)
    control: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    scans: Mapped[int] = mapped_column(Integer)  # cluster scans that day that checked it
    last_cluster_scan_id: Mapped[int] = mapped_column(Integer)
    last_started_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))
    targets: Mapped[int] = mapped_column(Integer)
    passing: Mapped[int] = mapped_column(Integer)
    failing: Mapped[int] = mapped_column(Integer)
    unknown: Mapped[int] = mapped_column(Integer)
    waived: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (Index("ix_daily_control_summary_control_day", "control", "day"),)


class NodeState(Base):
    """Each node's current verdict and since when, kept at write time for streak queries.

    Felix's nodes only (control felix-metrics): Typha's and kube-controllers' targets have none.
    """

    __tablename__ = "node_states"

    cluster: Mapped[str] = mapped_column(String(255), primary_key=True)
    node: Mapped[str] = mapped_column(String(253), primary_key=True)
    verdict: Mapped[str] = mapped_column(String(8))
    since: Mapped[datetime]  # the first scan of the current run of this verdict
    streak_scans: Mapped[int] = mapped_column(Integer)  # consecutive scans with this verdict
    first_seen: Mapped[datetime]
    last_scan_at: Mapped[datetime]
    last_cluster_scan_id: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_node_states_cluster_verdict", "cluster", "verdict"),)


class StoredReport(Base):
    """A report felixscan rendered; retention keeps every scan a stored report refers to."""

    __tablename__ = "stored_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime]
    format: Mapped[str] = mapped_column(String(8))
    sha256: Mapped[str] = mapped_column(String(64))
    location: Mapped[str | None] = mapped_column(Text)
    clusters: Mapped[list[str]] = mapped_column(JSON)
    since: Mapped[date] = mapped_column(Date)
    until: Mapped[date] = mapped_column(Date)
    scan_ids: Mapped[list[int]] = mapped_column(JSON)  # scan_runs ids the report draws on
    keep: Mapped[bool] = mapped_column(Boolean, default=True)

    __table_args__ = (Index("ix_stored_reports_sha256", "sha256"),)


class RemediationAction(Base):
    """One remediation, planned or applied, with what it changed and how it ended."""

    __tablename__ = "remediation_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    trigger: Mapped[str] = mapped_column(String(64))  # "cli:<user>@<host>", "serve:auto", ...
    install: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))  # apply, rollback
    # planned, applying, rolling_out, verifying, succeeded, failed, refused, rolled_back
    outcome: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text)
    # [{apiVersion, kind, namespace, name, patch_type, patch, before, after, resourceVersion}]
    objects: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    verify_run_id: Mapped[int | None] = mapped_column(ForeignKey("scan_runs.id",
                                                                 ondelete="SET NULL"))
    rollback_of: Mapped[int | None] = mapped_column(ForeignKey("remediation_actions.id",
                                                               ondelete="SET NULL"))

    __table_args__ = (Index("ix_remediation_actions_cluster_started_at", "cluster",
                            "started_at"),)


class Lease(Base):
    """Who holds a named lock (`cluster:prod-east`, `run:42`), and the fence its writes check.

    SQLite (no advisory locks): the row is the lock. A holder that crashed stops renewing; its
    lease expires and another process may take it, at once when the holder was a process of
    this machine that is gone. PostgreSQL: the advisory lock decides and `expires_at` is not
    used (it equals `acquired_at`); the row names the holder, and a result is stored only while
    it still names the process that stores it.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))  # one id per acquisition
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    host: Mapped[str | None] = mapped_column(String(255))  # the holder's hostname
    pid: Mapped[int | None] = mapped_column(Integer)  # the holder's process id on that host
    # Boot id and PID namespace: pids are comparable only between processes of the same one
    # (containers sharing a hostname have PID namespaces of their own).
    pid_scope: Mapped[str | None] = mapped_column(String(128))


def normalise_url(url: str) -> str:
    """Accept the plain `postgresql://` spelling and use psycopg 3 for it."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    """An engine with the per-backend settings felixscan relies on."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets readers (reports, serve) go on while a scan writes; busy_timeout makes
            # a second writer wait instead of failing at once.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
