"""Accepted risks: the waivers that applied to each cluster scan, the nodes they waived, the
waiver behind each waived finding, and the waived nodes of each day's rollup

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD/DROP COLUMN, as in 0004. Scans stored before this revision waived nothing: 0, NULL.
def upgrade() -> None:
    op.add_column("cluster_scans", sa.Column("nodes_waived", sa.Integer(), nullable=False,
                                             server_default="0"))
    op.add_column("cluster_scans", sa.Column("waivers", sa.JSON(), nullable=True))
    op.add_column("findings", sa.Column("waiver", sa.String(length=64), nullable=True))
    op.add_column("daily_cluster_summary", sa.Column("waived", sa.Integer(), nullable=False,
                                                     server_default="0"))


def downgrade() -> None:
    op.execute("ALTER TABLE daily_cluster_summary DROP COLUMN waived")
    op.execute("ALTER TABLE findings DROP COLUMN waiver")
    op.execute("ALTER TABLE cluster_scans DROP COLUMN waivers")
    op.execute("ALTER TABLE cluster_scans DROP COLUMN nodes_waived")
