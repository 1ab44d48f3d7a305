"""double-entry ledger: external accounts, ledger_entries, immutable journal

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 09:00:00

Accounts get a kind: 'customer' (owned by a user, never negative) or 'external' (one per
currency, no owner; deposits come from it and withdrawals go to it; it caches no balance, which
stays 0). Every balance change is a transfer row plus two ledger_entries rows that sum to zero.
Triggers refuse UPDATE and DELETE on transfers and ledger_entries.

Existing data is carried over: each existing transfer gets its two entries, and whatever part of
a balance the transfers do not explain (deposits and withdrawals made before the ledger) becomes
one opening transfer from or to the external account, so balance = sum(entries) from the start.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IMMUTABLE_TABLES = ("transfers", "ledger_entries")

BACKFILL = (
    """
    INSERT INTO accounts (kind, user_id, currency, balance)
    SELECT DISTINCT 'external', NULL::bigint, currency, 0 FROM accounts
    """,
    """
    INSERT INTO ledger_entries (transfer_id, account_id, amount, created_at)
    SELECT id, from_account_id, -amount, created_at FROM transfers
    UNION ALL
    SELECT id, to_account_id, amount, created_at FROM transfers
    """,
    """
    WITH gap AS (
        SELECT a.id, a.currency, a.balance - coalesce(sum(e.amount), 0) AS diff
        FROM accounts a LEFT JOIN ledger_entries e ON e.account_id = a.id
        WHERE a.kind = 'customer'
        GROUP BY a.id
    ), opening AS (
        INSERT INTO transfers (from_account_id, to_account_id, amount, request_id)
        SELECT CASE WHEN g.diff > 0 THEN x.id ELSE g.id END,
               CASE WHEN g.diff > 0 THEN g.id ELSE x.id END,
               abs(g.diff),
               'ledger-opening-' || g.id
        FROM gap g JOIN accounts x ON x.kind = 'external' AND x.currency = g.currency
        WHERE g.diff <> 0
        RETURNING id, from_account_id, to_account_id, amount
    )
    INSERT INTO ledger_entries (transfer_id, account_id, amount)
    SELECT id, from_account_id, -amount FROM opening
    UNION ALL
    SELECT id, to_account_id, amount FROM opening
    """,
)


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("kind", sa.String(length=8), server_default="customer", nullable=False),
    )
    op.alter_column("accounts", "user_id", existing_type=sa.BigInteger(), nullable=True)
    op.create_check_constraint(
        op.f("ck_accounts_external_balance_not_cached"),
        "accounts",
        "kind = 'customer' OR balance = 0",
    )
    op.create_check_constraint(
        op.f("ck_accounts_kind"), "accounts", "kind IN ('customer', 'external')"
    )
    op.create_check_constraint(
        op.f("ck_accounts_owner_matches_kind"),
        "accounts",
        "(kind = 'customer') = (user_id IS NOT NULL)",
    )
    op.create_index(
        "uq_accounts_external_currency",
        "accounts",
        ["currency"],
        unique=True,
        postgresql_where=sa.text("kind = 'external'"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("transfer_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=18, scale=2), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_ledger_entries_amount_not_zero")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_ledger_entries_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["transfer_id"], ["transfers.id"], name=op.f("fk_ledger_entries_transfer_id_transfers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint(
            "transfer_id", "account_id", name=op.f("uq_ledger_entries_transfer_id")
        ),
    )
    op.create_index(
        "ix_ledger_entries_account_id_id", "ledger_entries", ["account_id", "id"], unique=False
    )
    for statement in BACKFILL:
        op.execute(statement)
    op.execute(
        """
        CREATE FUNCTION refuse_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% rows are immutable: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'restrict_violation';
        END
        $$
        """
    )
    for table in IMMUTABLE_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change()"
        )


def downgrade() -> None:
    for table in IMMUTABLE_TABLES:
        op.execute(f"DROP TRIGGER {table}_immutable ON {table}")
    op.execute("DROP FUNCTION refuse_ledger_change()")
    op.drop_index("ix_ledger_entries_account_id_id", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    # Before the ledger, deposits and withdrawals left no transfer row: drop the ones that
    # touch external accounts (the balances they produced stay), then the accounts themselves.
    op.execute(
        """
        DELETE FROM transfers t USING accounts x
        WHERE x.kind = 'external' AND x.id IN (t.from_account_id, t.to_account_id)
        """
    )
    op.execute("DELETE FROM accounts WHERE kind = 'external'")
    op.drop_index(
        "uq_accounts_external_currency",
        table_name="accounts",
        postgresql_where=sa.text("kind = 'external'"),
    )
    op.drop_constraint(op.f("ck_accounts_owner_matches_kind"), "accounts", type_="check")
    op.drop_constraint(op.f("ck_accounts_kind"), "accounts", type_="check")
    op.drop_constraint(op.f("ck_accounts_external_balance_not_cached"), "accounts", type_="check")
    op.alter_column("accounts", "user_id", existing_type=sa.BigInteger(), nullable=False)
    op.drop_column("accounts", "kind")
