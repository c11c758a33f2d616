"""node_probes.addresses and .declared_host, cluster_scans.declared_host: every address of a
node is probed, and where Felix binds its metrics is kept

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD/DROP COLUMN (SQLite has both since 3.35): a batch copy of cluster_scans would
# trip over the analyst views that read it.
def upgrade() -> None:
    op.add_column("node_probes", sa.Column("addresses", sa.JSON(), nullable=True))
    op.add_column("node_probes", sa.Column("declared_host", sa.String(length=255), nullable=True))
    op.add_column("cluster_scans", sa.Column("declared_host", sa.String(length=255),
                                             nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE cluster_scans DROP COLUMN declared_host")
    op.execute("ALTER TABLE node_probes DROP COLUMN declared_host")
    op.execute("ALTER TABLE node_probes DROP COLUMN addresses")
