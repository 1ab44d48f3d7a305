"""orders.currency, step 2 of 3 (backfill): fill existing rows in batches

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 10:00:01

Runs in an autocommit block: every batch is its own short transaction, so row locks are held
for one batch only, statement_timeout bounds one batch (not the whole table), and progress
survives a failure. Restartable: it only touches rows still NULL, walking the primary key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH_SIZE = 1000
# Keyset over the primary key: each batch starts where the last ended, so the scan never
# rereads rows already done. FOR UPDATE SKIP LOCKED is not used: a row locked by an RPC must
# not be skipped, only waited for (briefly, under lock_timeout).
BATCH = sa.text(
    """
    UPDATE orders SET currency = 'EUR'
    WHERE id IN (
        SELECT id FROM orders
        WHERE id > :after AND currency IS NULL
        ORDER BY id
        LIMIT :batch_size
    )
    RETURNING id
    """
)


def upgrade() -> None:
    if context.is_offline_mode():
        # An --sql script cannot loop on results: it carries one batch over the whole table.
        op.execute(BATCH.bindparams(after=0, batch_size=2**31 - 1))
        return
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        after = 0
        while True:
            ids = bind.execute(BATCH, {"after": after, "batch_size": BATCH_SIZE}).scalars().all()
            if not ids:
                break
            after = max(ids)


def downgrade() -> None:
    # Nothing to undo: 0003's downgrade drops the column and the values with it.
    pass
