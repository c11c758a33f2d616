"""rollups, node states, stored reports, remediation actions, leases; analyst views

The rollup tables are filled from existing scans on upgrade, so trends cover old data too.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table('daily_cluster_summary',
    sa.Column('cluster', sa.String(length=255), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('scans', sa.Integer(), nullable=False),
    sa.Column('last_cluster_scan_id', sa.Integer(), nullable=False),
    sa.Column('last_started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('nodes', sa.Integer(), nullable=False),
    sa.Column('passing', sa.Integer(), nullable=False),
    sa.Column('failing', sa.Integer(), nullable=False),
    sa.Column('unknown', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('cluster', 'day', name=op.f('pk_daily_cluster_summary'))
    )
    with op.batch_alter_table('daily_cluster_summary', schema=None) as batch_op:
        batch_op.create_index('ix_daily_cluster_summary_day', ['day'], unique=False)

    op.create_table('leases',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('holder', sa.String(length=255), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_leases'))
    )
    op.create_table('node_states',
    sa.Column('cluster', sa.String(length=255), nullable=False),
    sa.Column('node', sa.String(length=253), nullable=False),
    sa.Column('verdict', sa.String(length=8), nullable=False),
    sa.Column('since', sa.DateTime(timezone=True), nullable=False),
    sa.Column('streak_scans', sa.Integer(), nullable=False),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_scan_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_cluster_scan_id', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('cluster', 'node', name=op.f('pk_node_states'))
    )
    with op.batch_alter_table('node_states', schema=None) as batch_op:
        batch_op.create_index('ix_node_states_cluster_verdict', ['cluster', 'verdict'], unique=False)

    op.create_table('stored_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('format', sa.String(length=8), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('location', sa.Text(), nullable=True),
    sa.Column('clusters', sa.JSON(), nullable=False),
    sa.Column('since', sa.Date(), nullable=False),
    sa.Column('until', sa.Date(), nullable=False),
    sa.Column('scan_ids', sa.JSON(), nullable=False),
    sa.Column('keep', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stored_reports'))
    )
    with op.batch_alter_table('stored_reports', schema=None) as batch_op:
        batch_op.create_index('ix_stored_reports_sha256', ['sha256'], unique=False)

    op.create_table('remediation_actions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('cluster', sa.String(length=255), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('trigger', sa.String(length=64), nullable=False),
    sa.Column('install', sa.String(length=16), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('objects', sa.JSON(), nullable=False),
    sa.Column('verify_run_id', sa.Integer(), nullable=True),
    sa.Column('rollback_of', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['rollback_of'], ['remediation_actions.id'], name=op.f('fk_remediation_actions_rollback_of_remediation_actions'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['verify_run_id'], ['scan_runs.id'], name=op.f('fk_remediation_actions_verify_run_id_scan_runs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_remediation_actions'))
    )
    with op.batch_alter_table('remediation_actions', schema=None) as batch_op:
        batch_op.create_index('ix_remediation_actions_cluster_started_at', ['cluster', 'started_at'], unique=False)

    with op.batch_alter_table('cluster_scans', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pruned_at', sa.DateTime(timezone=True), nullable=True))




    with op.batch_alter_table("node_probes") as batch_op:
        batch_op.drop_index("ix_node_probes_node")
        batch_op.drop_index("ix_node_probes_cluster_scan_id")
        batch_op.create_index("ix_node_probes_cluster_scan_id_node", ["cluster_scan_id", "node"])
    _backfill()
    for name, sql in VIEWS:
        op.execute(f"CREATE VIEW {name} AS {sql}")


VIEWS = (
    ("daily_cluster_compliance", """
        SELECT cluster, day, scans, status, nodes, passing, failing, unknown,
               CASE WHEN nodes > 0 THEN CAST(passing AS REAL) / nodes END AS ratio,
               last_cluster_scan_id
        FROM daily_cluster_summary"""),
    ("latest_cluster_status", """
        SELECT cs.cluster, cs.id AS cluster_scan_id, cs.run_id AS scan_id, cs.started_at,
               cs.status, cs.install, cs.declared_enabled, cs.declared_source, cs.declared_port,
               cs.nodes_total, cs.nodes_pass, cs.nodes_fail, cs.nodes_unknown, cs.error
        FROM daily_cluster_summary d
        JOIN cluster_scans cs ON cs.id = d.last_cluster_scan_id
        WHERE d.day = (SELECT max(d2.day) FROM daily_cluster_summary d2
                       WHERE d2.cluster = d.cluster)"""),
    ("node_failure_streaks", """
        SELECT ns.cluster, ns.node, ns.verdict, ns.since AS failing_since, ns.streak_scans,
               ns.first_seen, ns.last_scan_at
        FROM node_states ns
        JOIN latest_cluster_status l
          ON l.cluster = ns.cluster AND l.cluster_scan_id = ns.last_cluster_scan_id
        WHERE ns.verdict <> 'pass'"""),
)


def _when(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _backfill() -> None:
    """Rollups and node states from the scans already stored, oldest first."""
    conn = op.get_bind()
    scans = conn.execute(sa.text(
        "SELECT id, cluster, started_at, status, nodes_total, nodes_pass, nodes_fail, "
        "nodes_unknown FROM cluster_scans ORDER BY started_at, id")).fetchall()
    days: dict[tuple[str, Any], dict[str, Any]] = {}
    states: dict[tuple[str, str], dict[str, Any]] = {}
    for sid, cluster, started, status, total, passing, failing, unknown in scans:
        when = _when(started)
        key = (cluster, when.date())
        prior = days.get(key)
        days[key] = {"cluster": cluster, "day": when.date(),
                     "scans": (prior["scans"] if prior else 0) + 1,
                     "last_cluster_scan_id": sid, "last_started_at": when, "status": status,
                     "nodes": total, "passing": passing, "failing": failing, "unknown": unknown}
        for node, verdict in conn.execute(sa.text(
                "SELECT node, verdict FROM node_probes WHERE cluster_scan_id = :id"),
                {"id": sid}):
            old = states.get((cluster, node))
            same = old is not None and old["verdict"] == verdict
            states[(cluster, node)] = {
                "cluster": cluster, "node": node, "verdict": verdict,
                "since": old["since"] if same and old else when,
                "streak_scans": old["streak_scans"] + 1 if same and old else 1,
                "first_seen": old["first_seen"] if old else when,
                "last_scan_at": when, "last_cluster_scan_id": sid}
    summary = sa.table("daily_cluster_summary", *(sa.column(c) for c in (
        "cluster", "day", "scans", "last_cluster_scan_id", "last_started_at", "status", "nodes",
        "passing", "failing", "unknown")))
    node_states = sa.table("node_states", *(sa.column(c) for c in (
        "cluster", "node", "verdict", "since", "streak_scans", "first_seen", "last_scan_at",
        "last_cluster_scan_id")))
    if conn.dialect.name == "sqlite":  # stored as naive UTC text, as scanner.db does
        for row in [*days.values(), *states.values()]:
            for key, value in row.items():
                if isinstance(value, datetime):
                    row[key] = value.replace(tzinfo=None)
    if days:
        op.bulk_insert(summary, list(days.values()))
    if states:
        op.bulk_insert(node_states, list(states.values()))


def downgrade() -> None:
    for name, _sql in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table("node_probes") as batch_op:
        batch_op.drop_index("ix_node_probes_cluster_scan_id_node")
        batch_op.create_index("ix_node_probes_cluster_scan_id", ["cluster_scan_id"])
        batch_op.create_index("ix_node_probes_node", ["node"])

    with op.batch_alter_table('cluster_scans', schema=None) as batch_op:
        batch_op.drop_column('pruned_at')

    with op.batch_alter_table('remediation_actions', schema=None) as batch_op:
        batch_op.drop_index('ix_remediation_actions_cluster_started_at')

    op.drop_table('remediation_actions')
    with op.batch_alter_table('stored_reports', schema=None) as batch_op:
        batch_op.drop_index('ix_stored_reports_sha256')

    op.drop_table('stored_reports')
    with op.batch_alter_table('node_states', schema=None) as batch_op:
        batch_op.drop_index('ix_node_states_cluster_verdict')

    op.drop_table('node_states')
    op.drop_table('leases')
    with op.batch_alter_table('daily_cluster_summary', schema=None) as batch_op:
        batch_op.drop_index('ix_daily_cluster_summary_day')

    op.drop_table('daily_cluster_summary')

