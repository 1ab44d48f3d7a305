"""orders.currency, step 1 of 3 (expand): add the column, nullable

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 10:00:00

Expand-contract (docs/migrations.md). Adding a nullable column without a default is a catalog
change: a brief ACCESS EXCLUSIVE lock (bounded by lock_timeout), no table rewrite. Existing rows
stay NULL until 0004 backfills them. The DEFAULT covers new rows written by builds that do not
know the column yet (they keep serving during the rollout); this build writes it itself.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("currency", sa.String(length=3)), if_not_exists=True)
    # A separate statement on purpose: as part of ADD COLUMN the default would also fill every
    # existing row (virtually, PG 11+), and the backfill would have nothing left to prove.
    op.alter_column("orders", "currency", server_default="EUR")


def downgrade() -> None:
    op.drop_column("orders", "currency")
