"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table('scan_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('trigger', sa.String(length=32), nullable=False),
    sa.Column('tool_version', sa.String(length=64), nullable=False),
    sa.Column('scanner_host', sa.String(length=255), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scan_runs'))
    )
    with op.batch_alter_table('scan_runs', schema=None) as batch_op:
        batch_op.create_index('ix_scan_runs_started_at', ['started_at'], unique=False)

    op.create_table('cluster_scans',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('cluster', sa.String(length=255), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('install', sa.String(length=16), nullable=False),
    sa.Column('declared_enabled', sa.Boolean(), nullable=True),
    sa.Column('declared_source', sa.Text(), nullable=True),
    sa.Column('declared_port', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('nodes_total', sa.Integer(), nullable=False),
    sa.Column('nodes_pass', sa.Integer(), nullable=False),
    sa.Column('nodes_fail', sa.Integer(), nullable=False),
    sa.Column('nodes_unknown', sa.Integer(), nullable=False),
    sa.Column('namespace', sa.String(length=255), nullable=True),
    sa.Column('daemonset', sa.String(length=255), nullable=True),
    sa.Column('image', sa.Text(), nullable=True),
    sa.Column('snapshot', sa.JSON(), nullable=False),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['scan_runs.id'], name=op.f('fk_cluster_scans_run_id_scan_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cluster_scans'))
    )
    with op.batch_alter_table('cluster_scans', schema=None) as batch_op:
        batch_op.create_index('ix_cluster_scans_cluster_started_at', ['cluster', 'started_at'], unique=False)
        batch_op.create_index('ix_cluster_scans_run_id', ['run_id'], unique=False)
        batch_op.create_index('ix_cluster_scans_started_at', ['started_at'], unique=False)

    op.create_table('findings',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('cluster_scan_id', sa.Integer(), nullable=False),
    sa.Column('finding_id', sa.String(length=64), nullable=False),
    sa.Column('severity', sa.String(length=16), nullable=False),
    sa.Column('node', sa.String(length=253), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('remediation', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['cluster_scan_id'], ['cluster_scans.id'], name=op.f('fk_findings_cluster_scan_id_cluster_scans'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_findings'))
    )
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.create_index('ix_findings_cluster_scan_id', ['cluster_scan_id'], unique=False)
        batch_op.create_index('ix_findings_finding_id', ['finding_id'], unique=False)

    op.create_table('node_probes',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('cluster_scan_id', sa.Integer(), nullable=False),
    sa.Column('node', sa.String(length=253), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=True),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('protocol', sa.String(length=8), nullable=True),
    sa.Column('felix', sa.Boolean(), nullable=True),
    sa.Column('http_status', sa.Integer(), nullable=True),
    sa.Column('verdict', sa.String(length=8), nullable=False),
    sa.Column('declared_enabled', sa.Boolean(), nullable=True),
    sa.Column('declared_source', sa.Text(), nullable=True),
    sa.Column('pod_current', sa.Boolean(), nullable=True),
    sa.Column('node_ready', sa.Boolean(), nullable=True),
    sa.Column('tls_version', sa.String(length=16), nullable=True),
    sa.Column('tls_subject', sa.Text(), nullable=True),
    sa.Column('tls_issuer', sa.Text(), nullable=True),
    sa.Column('tls_self_signed', sa.Boolean(), nullable=True),
    sa.Column('tls_not_after', sa.DateTime(timezone=True), nullable=True),
    sa.Column('tls_sha256', sa.String(length=64), nullable=True),
    sa.Column('felix_host', sa.String(length=253), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('connect_ms', sa.Float(), nullable=True),
    sa.Column('duration_ms', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['cluster_scan_id'], ['cluster_scans.id'], name=op.f('fk_node_probes_cluster_scan_id_cluster_scans'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_node_probes'))
    )
    with op.batch_alter_table('node_probes', schema=None) as batch_op:
        batch_op.create_index('ix_node_probes_cluster_scan_id', ['cluster_scan_id'], unique=False)
        batch_op.create_index('ix_node_probes_node', ['node'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('node_probes', schema=None) as batch_op:
        batch_op.drop_index('ix_node_probes_node')
        batch_op.drop_index('ix_node_probes_cluster_scan_id')

    op.drop_table('node_probes')
    with op.batch_alter_table('findings', schema=None) as batch_op:
        batch_op.drop_index('ix_findings_finding_id')
        batch_op.drop_index('ix_findings_cluster_scan_id')

    op.drop_table('findings')
    with op.batch_alter_table('cluster_scans', schema=None) as batch_op:
        batch_op.drop_index('ix_cluster_scans_started_at')
        batch_op.drop_index('ix_cluster_scans_run_id')
        batch_op.drop_index('ix_cluster_scans_cluster_started_at')

    op.drop_table('cluster_scans')
    with op.batch_alter_table('scan_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_scan_runs_started_at')

    op.drop_table('scan_runs')

