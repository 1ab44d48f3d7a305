"""idempotency_keys.created_at: a BRIN index instead of a B-tree, built and dropped CONCURRENTLY

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 19:40:00

Issue 22 cuts what each transfer writes. Every money posting inserts one idempotency key, and
each key paid an entry in the B-tree on created_at, which one statement reads: the purge
(`python -m service purge-idempotency-keys`, from cron), `DELETE ... WHERE created_at < :cutoff`.
Keys are appended in created_at order, so a BRIN index (one summary per 128 pages) finds the
expired ones as well, and an insert on the table's unsummarized tail costs it nothing (VACUUM
summarizes the new ranges). The price: once the purge's deletions are vacuumed and new keys
reuse that space, a range's summary widens (it never shrinks), and the purge reads more pages
than it deletes, at worst the whole table, once per run and outside any request.

Zero-downtime: no build names either index (the purge's DELETE is the same with either, or
none), so this runs under any build. The new index is built first, then the old one dropped;
each step CONCURRENTLY (no write lock) in an autocommit block, and a leftover INVALID index of
a failed run dropped before the build, as in 0006. A rerun does it all again.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "idempotency_keys"
BTREE = "ix_idempotency_keys_created_at"
BRIN = "brin_idempotency_keys_created_at"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(BRIN, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
        op.create_index(
            BRIN,
            TABLE,
            ["created_at"],
            postgresql_using="brin",
            if_not_exists=True,
            postgresql_concurrently=True,
        )
        op.drop_index(BTREE, table_name=TABLE, if_exists=True, postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(BTREE, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
        op.create_index(
            BTREE, TABLE, ["created_at"], if_not_exists=True, postgresql_concurrently=True
        )
        op.drop_index(BRIN, table_name=TABLE, if_exists=True, postgresql_concurrently=True)
