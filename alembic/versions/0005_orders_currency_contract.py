"""orders.currency, step 3 of 3 (contract): NOT NULL without a long lock

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 10:00:02

Deploy it only when no running build writes orders without currency (every build since 0003
does). SET NOT NULL alone would scan the whole table under ACCESS EXCLUSIVE. Instead:
CHECK ... NOT VALID (brief lock, no scan), VALIDATE (scans under SHARE UPDATE EXCLUSIVE, which
lets reads and writes through), then SET NOT NULL, which PostgreSQL 12+ proves from the
validated check without a scan, and drop the helper check. Each step commits on its own (an
autocommit block): in one transaction the first step's lock would be held through the scan.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECK = "ck_orders_currency_not_null"
# squawk (docs/migrations.md) flags every dropped constraint and default; these two drops are
# the point of the step, so each carries an ignore comment naming its rule.
DROP_HELPER_CHECK = f"""
-- squawk-ignore ban-drop-constraint
ALTER TABLE orders DROP CONSTRAINT IF EXISTS {CHECK}
"""

DROP_DEFAULT = """
-- squawk-ignore ban-drop-default
ALTER TABLE orders ALTER COLUMN currency DROP DEFAULT
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        # A rerun after a failure part way finds the helper check already there.
        op.execute(DROP_HELPER_CHECK)
        op.execute(
            f"ALTER TABLE orders ADD CONSTRAINT {CHECK} CHECK (currency IS NOT NULL) NOT VALID"
        )
        op.execute(f"ALTER TABLE orders VALIDATE CONSTRAINT {CHECK}")
    # Back in the migration's own transaction: the ACCESS EXCLUSIVE lock of SET NOT NULL is
    # held only for these catalog changes, and a failure leaves none of them half done.
    op.alter_column("orders", "currency", existing_type=sa.String(length=3), nullable=False)
    # Every build from 0003 on writes currency itself: the default was for the builds before.
    op.execute(DROP_DEFAULT)
    op.execute(DROP_HELPER_CHECK)


def downgrade() -> None:
    op.alter_column(
        "orders",
        "currency",
        existing_type=sa.String(length=3),
        nullable=True,
        server_default="EUR",
    )
