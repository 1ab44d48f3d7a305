"""index orders (status, id), built CONCURRENTLY

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 10:00:03

For ListOrders and StreamOrders filtered by status. CREATE INDEX CONCURRENTLY does not block
writes but cannot run inside a transaction: hence the autocommit block. It can fail part way
and leave an INVALID index behind; dropping any leftover first makes a rerun build a valid one.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_orders_status_id"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="orders", if_exists=True, postgresql_concurrently=True)
        op.create_index(
            INDEX, "orders", ["status", "id"], if_not_exists=True, postgresql_concurrently=True
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="orders", if_exists=True, postgresql_concurrently=True)
