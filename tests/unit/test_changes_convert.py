"""api/changes_convert: a resource in the change feed is the message its own converter gives
for the same row read the usual way, field for field. The rows are PostgreSQL's own to_jsonb
text (as alembic 0007's triggers write it), read back as the feed reads it; so, unlike the rest
of tests/unit, these tests use the real database, and clean their tables as the others do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import change_feed_service_pb2 as api
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import resources_pb2 as pb
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.api.accounts_convert import ANSWERS, account_to_proto, transfer_to_proto
from service.api.changes_convert import change_to_proto
from service.api.convert import timestamp
from service.api.orders_convert import order_to_proto
from service.api.users_convert import user_row_to_proto
from service.app.accounts import Accounts
from service.app.changes import FeedChange, Operation, ResourceType
from service.app.money_rules import Kind, Posting
from service.app.orders import Orders
from service.app.users import Users
from service.db.database import Database
from service.db.models import Account, Base, OrderStatus, Transfer
from service.repositories.accounts import ACCOUNT_COLUMNS
from service.repositories.orders import ItemFields
from tests.ids import rid

COMMIT_TIME = datetime(2026, 12, 7, 13, 18, 35, 790123, tzinfo=UTC)


@pytest_asyncio.fixture(autouse=True)
async def _clean_tables(engine: AsyncEngine) -> AsyncIterator[None]:
    """tests/conftest.py's cleaning, which tests/unit/conftest.py turns off for pure tests."""
    yield
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture
def db(engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> Database:
    return Database(engine, sessions)


async def jsonb_row(
    engine: AsyncEngine, table: str, row_id: int, *, time_zone: str = "UTC"
) -> dict[str, Any]:
    """The row as to_jsonb writes it in a session with this TimeZone, read as the feed reads
    it; an order's with its lines under "items", in id order."""
    async with engine.connect() as conn:
        await conn.execute(text(f"SET TimeZone = '{time_zone}'"))
        row_text = await conn.scalar(
            text(f"SELECT to_jsonb(t)::text FROM {table} t WHERE id = :id"), {"id": row_id}
        )
        items_text = await conn.scalar(
            text(
                "SELECT coalesce(jsonb_agg(to_jsonb(i) ORDER BY i.id), '[]')::text "
                "FROM order_items i WHERE order_id = :id"
            ),
            {"id": row_id},
        )
        await conn.execute(text("RESET TimeZone"))
    row: dict[str, Any] = json.loads(row_text, parse_float=Decimal)
    if table == "orders":
        row["items"] = json.loads(items_text, parse_float=Decimal)
    return row


def feed(resource_type: ResourceType, row: dict[str, Any], sequence: int = 7) -> api.Change:
    change = FeedChange(resource_type, Operation.UPDATED, 3, COMMIT_TIME, row)
    return change_to_proto(change, sequence)


async def test_a_change_carries_its_position_version_operation_and_commit_time(
    db: Database, engine: AsyncEngine
) -> None:
    user = await Users(db).create("ada@example.com", "Ada", "Lovelace")
    row = await jsonb_row(engine, "users", user.id)
    change = FeedChange(ResourceType.USER, Operation.DELETED, 4, COMMIT_TIME, row)
    message = change_to_proto(change, 123_456_789_012)
    assert message.sequence == 123_456_789_012
    assert message.resource_type == api.RESOURCE_TYPE_USER
    assert message.operation == api.OPERATION_DELETED
    assert message.version == 4
    assert message.commit_time == timestamp(COMMIT_TIME)
    assert message.WhichOneof("resource") == "user"


async def test_a_user_is_what_get_user_sends(db: Database, engine: AsyncEngine) -> None:
    users = Users(db)
    live = await users.create("ada@example.com", "Ada", "Lovelace")
    gone = await users.create("jose@example.com", "José María", "da Silva")
    await users.set_deleted(gone.id, deleted=True)
    # An operator's UPDATE in psql: fractions to_jsonb shortens (.5) or drops (whole second).
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE users SET created_at = '2026-01-02 03:04:05+00', "
                "updated_at = '2026-01-02 03:04:05.5+00', is_active = false WHERE id = :id"
            ),
            {"id": gone.id},
        )
    for user_id in (live.id, gone.id):
        expected = user_row_to_proto(await users.row(user_id))
        for zone in ("UTC", "America/St_Johns"):  # the writer's TimeZone is the offset written
            row = await jsonb_row(engine, "users", user_id, time_zone=zone)
            assert feed(ResourceType.USER, row).user == expected
    assert expected.full_name == "José María da Silva"
    assert expected.HasField("deleted_at")
    assert not expected.is_active


async def test_an_order_is_what_get_order_sends_without_its_user(
    db: Database, engine: AsyncEngine
) -> None:
    user = await Users(db).create("ada@example.com", "Ada", "Lovelace")
    orders = Orders(db)
    created = await orders.create(
        user.id,
        [
            ItemFields("SKU-2", 3, Decimal("9.99")),
            ItemFields("SKU-1", 1, Decimal("0")),
            ItemFields("SKU-3", 2, Decimal("100.50")),
        ],
        request=orders_api.CreateOrderRequest(user_id=user.id, request_id=rid()),
        answer=order_to_proto,
        parse=pb.Order.FromString,
    )
    await orders.move(created.id, OrderStatus.PAID)
    expected = order_to_proto(await orders.get(created.id))
    message = feed(ResourceType.ORDER, await jsonb_row(engine, "orders", created.id))
    assert message.order == expected
    assert [i.unit_price for i in expected.items] == ["9.99", "0.00", "100.50"]
    assert (expected.status, expected.total, expected.currency) == (
        pb.ORDER_STATUS_PAID,
        "230.97",
        "EUR",
    )


async def test_accounts_and_transfers_are_what_get_account_and_the_ledger_send(
    db: Database, engine: AsyncEngine
) -> None:
    user = await Users(db).create("ada@example.com", "Ada", "Lovelace")
    accounts = Accounts(db, ANSWERS)
    opened = []
    for _ in range(2):
        request = accounts_api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=rid())
        opened.append(
            await accounts.open(
                user.id,
                "EUR",
                request=request,
                answer=account_to_proto,
                parse=pb.Account.FromString,
            )
        )
    source, target = (a.id for a in opened)
    deposit = accounts_api.DepositRequest(account_id=source, amount="10.50", request_id=rid())
    await accounts.post(
        "Deposit", deposit, Posting(Kind.DEPOSIT, deposit.request_id, source, Decimal("10.50"))
    )
    transfer = accounts_api.TransferRequest(
        from_account_id=source, to_account_id=target, amount="10.5", request_id=rid()
    )
    await accounts.post(
        "Transfer",
        transfer,
        Posting(Kind.TRANSFER, transfer.request_id, source, Decimal("10.5"), target),
    )
    async with engine.connect() as conn:
        # The external account too (no user): the feed sends it, GetAccount does not reach it.
        account_rows = (await conn.execute(select(*ACCOUNT_COLUMNS).order_by(Account.id))).all()
        transfer_rows = (await conn.execute(select(Transfer).order_by(Transfer.id))).all()
    assert len(account_rows) == 3
    assert len(transfer_rows) == 2
    for row in account_rows:
        message = feed(ResourceType.ACCOUNT, await jsonb_row(engine, "accounts", row.id))
        assert message.account == account_to_proto(row)
    for row in transfer_rows:
        message = feed(ResourceType.TRANSFER, await jsonb_row(engine, "transfers", row.id))
        assert message.transfer == transfer_to_proto(row)
    assert {account_to_proto(row).balance for row in account_rows} == {"0.00", "10.50"}
    assert account_to_proto(await accounts.row(target)).balance == "10.50"


def test_a_number_json_wrote_without_a_point_is_money_as_the_converters_print_it() -> None:
    row = {
        "id": 1,
        "user_id": None,
        "kind": "external",
        "currency": "EUR",
        "balance": 0,
        "created_at": "2026-12-07T13:18:35+05:30",
        "updated_at": "2026-12-07T13:18:35.000001-03:00",
        "version": 1,
    }
    message = feed(ResourceType.ACCOUNT, row)
    assert message.account == pb.Account(
        id=1,
        currency="EUR",
        balance="0.00",
        created_at=timestamp(datetime.fromisoformat(row["created_at"])),
        updated_at=timestamp(datetime.fromisoformat(row["updated_at"])),
    )
    assert message.account.created_at.ToDatetime(UTC) == datetime(
        2026, 12, 7, 7, 48, 35, tzinfo=UTC
    )
