"""scan_runs.cluster and scan_runs.note: which cluster a skipped run was for, and why

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("scan_runs") as batch_op:
        batch_op.add_column(sa.Column("cluster", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scan_runs") as batch_op:
        batch_op.drop_column("note")
        batch_op.drop_column("cluster")
