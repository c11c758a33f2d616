"""leases.host, .pid and .pid_scope: which process holds a lock, so that a holder that died
on this machine is recognised at once, and the "locked" message can name it

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ADD/DROP COLUMN, as in 0004 (SQLite has both since 3.35). Nullable: leases written
# before this revision (or by an older felixscan) name no process and are judged by expiry.
def upgrade() -> None:
    op.add_column("leases", sa.Column("host", sa.String(length=255), nullable=True))
    op.add_column("leases", sa.Column("pid", sa.Integer(), nullable=True))
    op.add_column("leases", sa.Column("pid_scope", sa.String(length=128), nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE leases DROP COLUMN pid_scope")
    op.execute("ALTER TABLE leases DROP COLUMN pid")
    op.execute("ALTER TABLE leases DROP COLUMN host")
