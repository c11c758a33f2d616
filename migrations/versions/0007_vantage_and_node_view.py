"""scan_runs.vantage: where a run probed from (a name from the config or --vantage; the host name
by default); node_probes.node_view: what node-check said on the node when it was probed

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD/DROP COLUMN, as in 0004. Runs stored before this revision probed from their host:
# their vantage is their scanner_host (readers fall back to it where vantage is NULL).
def upgrade() -> None:
    op.add_column("scan_runs", sa.Column("vantage", sa.String(length=255), nullable=True))
    op.add_column("node_probes", sa.Column("node_view", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE node_probes DROP COLUMN node_view")
    op.execute("ALTER TABLE scan_runs DROP COLUMN vantage")
