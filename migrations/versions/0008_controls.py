"""The control catalogue: one control_scans row per control checked in a cluster scan (Felix's,
Typha's and calico-kube-controllers' metrics endpoints), node_probes.control and .pod,
findings.control, the per-control day rollup daily_control_summary, and two analyst views

Every row written before this revision belongs to felix-metrics: the new columns default to it,
and each existing cluster scan and day rollup gets its felix-metrics row, copied from what it
recorded for Felix. A downgrade deletes the probes and findings of the other controls (an older
felixscan would read them as Felix's) and the per-control tables.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FELIX = "felix-metrics"
# Only the rows of controls other than Felix's: small, so it costs Felix's many probes nothing,
# and the web page finds a scan's Typha and kube-controllers targets without reading its nodes.
OTHER_CONTROLS = sa.text("control <> 'felix-metrics'")

VIEWS = (
    ("daily_control_compliance", """
        SELECT cluster, control, day, scans, status, targets, passing, failing, unknown,
               CASE WHEN targets > 0 THEN CAST(passing AS REAL) / targets END AS ratio,
               last_cluster_scan_id
        FROM daily_control_summary"""),
    ("latest_control_status", """
        SELECT l.cluster, c.control, l.cluster_scan_id, l.scan_id, l.started_at, c.status,
               c.installed, c.declared_enabled, c.declared_source, c.declared_port,
               c.declared_host, c.targets_total, c.targets_pass, c.targets_fail,
               c.targets_unknown, c.targets_waived, c.error
        FROM latest_cluster_status l
        JOIN control_scans c ON c.cluster_scan_id = l.cluster_scan_id"""),
)


# Plain ADD/DROP COLUMN, as in 0004: a batch copy of node_probes or findings would be slow on a
# big database and trip over the analyst views. ADD COLUMN ... NOT NULL DEFAULT is one catalogue
# change on both backends, whatever the table's size.
def upgrade() -> None:
    op.create_table(
        "control_scans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cluster_scan_id", sa.Integer(), nullable=False),
        sa.Column("control", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("installed", sa.Boolean(), nullable=False),
        sa.Column("declared_enabled", sa.Boolean(), nullable=True),
        sa.Column("declared_source", sa.Text(), nullable=True),
        sa.Column("declared_port", sa.Integer(), nullable=True),
        sa.Column("declared_host", sa.String(length=255), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("targets_total", sa.Integer(), nullable=False),
        sa.Column("targets_pass", sa.Integer(), nullable=False),
        sa.Column("targets_fail", sa.Integer(), nullable=False),
        sa.Column("targets_unknown", sa.Integer(), nullable=False),
        sa.Column("targets_waived", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=255), nullable=True),
        sa.Column("workload", sa.String(length=255), nullable=True),
        sa.Column("image", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["cluster_scan_id"], ["cluster_scans.id"],
                                name=op.f("fk_control_scans_cluster_scan_id_cluster_scans"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_control_scans")),
        sa.UniqueConstraint("cluster_scan_id", "control",
                            name=op.f("uq_control_scans_cluster_scan_id")),
    )
    op.create_index("ix_control_scans_cluster_scan_id", "control_scans", ["cluster_scan_id"])

    op.create_table(
        "daily_control_summary",
        sa.Column("cluster", sa.String(length=255), nullable=False),
        sa.Column("control", sa.String(length=32), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("scans", sa.Integer(), nullable=False),
        sa.Column("last_cluster_scan_id", sa.Integer(), nullable=False),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("targets", sa.Integer(), nullable=False),
        sa.Column("passing", sa.Integer(), nullable=False),
        sa.Column("failing", sa.Integer(), nullable=False),
        sa.Column("unknown", sa.Integer(), nullable=False),
        sa.Column("waived", sa.Integer(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("cluster", "control", "day",
                                name=op.f("pk_daily_control_summary")),
    )
    op.create_index("ix_daily_control_summary_control_day", "daily_control_summary",
                    ["control", "day"])

    op.add_column("node_probes", sa.Column("control", sa.String(length=32), nullable=False,
                                           server_default=FELIX))
    op.add_column("node_probes", sa.Column("pod", sa.String(length=253), nullable=True))
    op.add_column("findings", sa.Column("control", sa.String(length=32), nullable=False,
                                        server_default=FELIX))
    op.create_index("ix_node_probes_other_controls", "node_probes",
                    ["cluster_scan_id", "control"], sqlite_where=OTHER_CONTROLS,
                    postgresql_where=OTHER_CONTROLS)
    _backfill()
    for name, sql in VIEWS:
        op.execute(f"CREATE VIEW {name} AS {sql}")


def _backfill() -> None:
    """Each existing cluster scan and day rollup gets its felix-metrics row, from its own
    figures: until this revision a cluster scan checked Felix's endpoint alone."""
    cs = sa.table("cluster_scans", *(sa.column(c) for c in (
        "id", "status", "declared_enabled", "declared_source", "declared_port",
        "declared_host", "error", "nodes_total", "nodes_pass", "nodes_fail", "nodes_unknown",
        "nodes_waived", "namespace", "daemonset", "image")))
    control_scans = sa.table("control_scans", *(sa.column(c) for c in (
        "cluster_scan_id", "control", "status", "installed", "declared_enabled",
        "declared_source", "declared_port", "declared_host", "error", "targets_total",
        "targets_pass", "targets_fail", "targets_unknown", "targets_waived", "namespace",
        "workload", "image")))
    op.execute(control_scans.insert().from_select(
        [c.name for c in control_scans.c],
        sa.select(cs.c.id, sa.literal(FELIX, sa.String()), cs.c.status,
                  sa.literal(True, sa.Boolean()), cs.c.declared_enabled, cs.c.declared_source,
                  cs.c.declared_port, cs.c.declared_host, cs.c.error, cs.c.nodes_total,
                  cs.c.nodes_pass, cs.c.nodes_fail, cs.c.nodes_unknown, cs.c.nodes_waived,
                  cs.c.namespace, cs.c.daemonset, cs.c.image)))
    day = sa.table("daily_cluster_summary", *(sa.column(c) for c in (
        "cluster", "day", "scans", "last_cluster_scan_id", "last_started_at", "status",
        "nodes", "passing", "failing", "unknown", "waived")))
    daily_control = sa.table("daily_control_summary", *(sa.column(c) for c in (
        "cluster", "control", "day", "scans", "last_cluster_scan_id", "last_started_at",
        "status", "targets", "passing", "failing", "unknown", "waived")))
    op.execute(daily_control.insert().from_select(
        [c.name for c in daily_control.c],
        sa.select(day.c.cluster, sa.literal(FELIX, sa.String()), day.c.day, day.c.scans,
                  day.c.last_cluster_scan_id, day.c.last_started_at, day.c.status,
                  day.c.nodes, day.c.passing, day.c.failing, day.c.unknown, day.c.waived)))


def downgrade() -> None:
    for name, _sql in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    # An older felixscan reads every probe and finding as Felix's: drop the other controls'.
    for table in ("node_probes", "findings"):
        rows = sa.table(table, sa.column("control"))
        op.execute(rows.delete().where(rows.c.control != FELIX))
    op.drop_index("ix_node_probes_other_controls", table_name="node_probes")
    op.execute("ALTER TABLE findings DROP COLUMN control")
    op.execute("ALTER TABLE node_probes DROP COLUMN pod")
    op.execute("ALTER TABLE node_probes DROP COLUMN control")
    op.drop_index("ix_daily_control_summary_control_day", table_name="daily_control_summary")
    op.drop_table("daily_control_summary")
    op.drop_index("ix_control_scans_cluster_scan_id", table_name="control_scans")
    op.drop_table("control_scans")
