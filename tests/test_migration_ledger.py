"""Migration 0002 carries existing money into the ledger, and its downgrade carries it back."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from service.db.engine import create_unpooled_engine
from service.db.migrate import alembic_config
from tests.postgres import fresh_database_on

# Before the ledger: account 1 got 120.00 in deposits and sent 20.00 to account 2; account 2
# withdrew 15.00 of it; account 3 (USD) got a 5.00 deposit.
PRE_LEDGER = [
    "INSERT INTO users (email, first_name, last_name) VALUES ('ada@example.com', 'Ada', 'L')",
    "INSERT INTO accounts (user_id, currency, balance) VALUES (1, 'EUR', 100.00), "
    "(1, 'EUR', 5.00), (1, 'USD', 5.00)",
    "INSERT INTO transfers (from_account_id, to_account_id, amount, request_id) "
    "VALUES (1, 2, 20.00, 'old-1')",
]


def run(url: str, *statements: str) -> list[list[Any]]:
    async def go() -> list[list[Any]]:
        engine = create_unpooled_engine(url)
        try:
            async with engine.begin() as conn:
                results = [await conn.execute(text(s)) for s in statements]
                return [list(r.all()) if r.returns_rows else [] for r in results]
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_ledger_migration_backfills_and_downgrades(database_url: str) -> None:
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with fresh_database_on(server) as url:
        config = alembic_config(url)
        command.upgrade(config, "0001")
        run(url, *PRE_LEDGER)
        command.upgrade(config, "0002")

        [externals, customers, legs] = run(
            url,
            "SELECT currency, user_id, balance FROM accounts WHERE kind = 'external' "
            "ORDER BY currency",
            "SELECT a.id, a.balance, coalesce(sum(e.amount), 0) FROM accounts a "
            "LEFT JOIN ledger_entries e ON e.account_id = a.id WHERE a.kind = 'customer' "
            "GROUP BY a.id ORDER BY a.id",
            "SELECT t.request_id, t.amount, sum(e.amount), count(e.id) FROM transfers t "
            "JOIN ledger_entries e ON e.transfer_id = t.id GROUP BY t.id ORDER BY t.request_id",
        )
        assert externals == [("EUR", None, Decimal(0)), ("USD", None, Decimal(0))]
        assert [(id_, balance) for id_, balance, _ in customers] == [
            (1, Decimal("100.00")),
            (2, Decimal("5.00")),
            (3, Decimal("5.00")),
        ]
        assert all(balance == entries for _, balance, entries in customers)
        assert legs == [
            ("ledger-opening-1", Decimal("120.00"), Decimal(0), 2),
            ("ledger-opening-2", Decimal("15.00"), Decimal(0), 2),
            ("ledger-opening-3", Decimal("5.00"), Decimal(0), 2),
            ("old-1", Decimal("20.00"), Decimal(0), 2),
        ]
        with pytest.raises(DBAPIError, match="rows are immutable"):
            run(url, "UPDATE transfers SET amount = 1")

        command.downgrade(config, "0001")
        [accounts, transfers] = run(
            url,
            "SELECT id, currency, balance FROM accounts ORDER BY id",
            "SELECT request_id FROM transfers",
        )
        assert accounts == [
            (1, "EUR", Decimal("100.00")),
            (2, "EUR", Decimal("5.00")),
            (3, "USD", Decimal("5.00")),
        ]
        assert transfers == [("old-1",)]
