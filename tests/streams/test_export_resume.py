"""StreamOrders and StreamTransfers: resume tokens bound to their export and filters, items
loaded per batch (not per order), and the same bytes as GetOrder / ListTransfers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import account_service_pb2_grpc, order_service_pb2_grpc, user_service_pb2_grpc
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as users_api
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Account
from service.serving.server import RunningServer
from tests.conftest import StatementCounter
from tests.factories import Factory
from tests.rpc import rpc_fails, stream_fails
from tests.streams.helpers import insert_users

OrderStub = order_service_pb2_grpc.OrderServiceStub
AccountStub = account_service_pb2_grpc.AccountServiceStub
UserStub = user_service_pb2_grpc.UserServiceStub


async def insert_orders(engine: AsyncEngine, user_id: int, count: int, status: str) -> list[int]:
    """`count` orders in one statement; order n has n % 4 items (none for every fourth), with
    prices that a float would not keep exactly. Returns the ids ascending."""
    async with engine.begin() as conn:
        rows = await conn.execute(
            text(
                """
                WITH o AS (
                    INSERT INTO orders (user_id, status, total, currency)
                    SELECT :user_id, :status, 0, 'EUR' FROM generate_series(1, :count)
                    RETURNING id
                ), i AS (
                    INSERT INTO order_items (order_id, sku, quantity, unit_price)
                    SELECT o.id, 'SKU-' || o.id || '-' || k, k, k * 0.10 + 9999999999999.89
                    FROM o, generate_series(1, 3) k WHERE k <= o.id % 4
                )
                SELECT id FROM o ORDER BY id
                """
            ),
            {"user_id": user_id, "status": status, "count": count},
        )
        ids = [row.id for row in rows]
        await conn.execute(
            text(
                "UPDATE orders SET total = coalesce((SELECT sum(quantity * unit_price) "
                "FROM order_items WHERE order_id = orders.id), 0) WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )
    return ids


async def order_batches(stub: OrderStub, **request: Any) -> list[orders_api.OrderBatch]:
    return [b async for b in stub.StreamOrders(orders_api.StreamOrdersRequest(**request))]


async def transfer_batches(stub: AccountStub, **request: Any) -> list[accounts_api.TransferBatch]:
    call = stub.StreamTransfers(accounts_api.StreamTransfersRequest(**request))
    return [b async for b in call]


def orders_of(batches: list[orders_api.OrderBatch]) -> list[pb.Order]:
    return [o for b in batches for o in b.orders]


def transfers_of(batches: list[accounts_api.TransferBatch]) -> list[pb.Transfer]:
    return [t for b in batches for t in b.transfers]


@pytest.fixture
def driver_queries(server: RunningServer) -> Iterator[list[str]]:
    """Statements sent through asyncpg's own fetch/execute on the server's connections, which
    SQLAlchemy's cursor events do not see: none of the exports' should go this way."""
    sent: list[str] = []
    drivers: dict[int, Any] = {}

    def log(record: Any) -> None:
        sent.append(record.query)

    def watch(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        driver = dbapi_connection.driver_connection
        if id(driver) not in drivers:
            drivers[id(driver)] = driver
            driver.add_query_logger(log)

    event.listen(server.engine.sync_engine.pool, "checkout", watch)
    yield sent
    event.remove(server.engine.sync_engine.pool, "checkout", watch)
    for driver in drivers.values():
        driver.remove_query_logger(log)


# --------------------------------------------------------------------------- StreamOrders


async def test_stream_orders_resumes_exactly_after_the_last_order_delivered(
    order_stub: OrderStub, factory: Factory, engine: AsyncEngine
) -> None:
    ada, bob = await factory.user(), await factory.user()
    mine = []
    for _ in range(3):  # interleaved with another user's orders, which the filter skips
        mine += await insert_orders(engine, ada.id, 7, "pending")
        await insert_orders(engine, bob.id, 2, "pending")
    whole = await order_batches(order_stub, user_id=ada.id, batch_size=5)
    assert [len(b.orders) for b in whole] == [5, 5, 5, 5, 1]
    assert [o.id for o in orders_of(whole)] == mine
    assert all(b.resume_token for b in whole)

    for n, batch in enumerate(whole):
        rest = await order_batches(
            order_stub, user_id=ada.id, batch_size=3, resume_token=batch.resume_token
        )
        # Nothing twice, nothing missed, every field (items included) as the first export sent.
        assert orders_of(whole[: n + 1]) + orders_of(rest) == orders_of(whole), n
    assert (
        await order_batches(order_stub, user_id=ada.id, resume_token=whole[-1].resume_token) == []
    )


async def test_a_resumed_order_export_sees_orders_written_since(
    order_stub: OrderStub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    ids = await insert_orders(engine, user.id, 4, "pending")
    call = order_stub.StreamOrders(orders_api.StreamOrdersRequest(batch_size=2))
    first = await call.read()
    call.cancel()
    ids += await insert_orders(engine, user.id, 1, "pending")
    rest = await order_batches(order_stub, batch_size=2, resume_token=first.resume_token)
    assert [[o.id for o in b.orders] for b in rest] == [ids[2:4], ids[4:]]


async def test_streamed_orders_equal_get_order_items_and_money_included(
    order_stub: OrderStub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    await factory.order(user, items=[("ZED", 7, "0.10"), ("ALPHA", 1, "19.99"), ("ONE", 2, "1")])
    await insert_orders(engine, user.id, 9, "paid")
    await factory.order(user, items=[("MAX", 1, "9999999999999999.99")])

    streamed = orders_of(await order_batches(order_stub, batch_size=4))

    assert len(streamed) == 11
    assert [len(o.items) for o in streamed[1:10]] == [n % 4 for n in range(2, 11)]
    for order in streamed:
        fetched = await order_stub.GetOrder(orders_api.GetOrderRequest(id=order.id))
        fetched.ClearField("user")
        assert order == fetched
        assert order.SerializeToString() == fetched.SerializeToString()
    assert streamed[-1].items[0].unit_price == "9999999999999999.99"


async def test_stream_orders_reads_items_with_one_statement_per_batch(
    order_stub: OrderStub,
    factory: Factory,
    engine: AsyncEngine,
    statements: StatementCounter,
    driver_queries: list[str],
) -> None:
    ada, bob = await factory.user(), await factory.user()
    await insert_orders(engine, ada.id, 3, "pending")
    await insert_orders(engine, bob.id, 60, "pending")
    await order_batches(order_stub, user_id=ada.id)  # warm up

    def cost() -> tuple[int, int, int]:
        """SQLAlchemy's statements; statements reading orders or items, and those of them
        reading items, whichever way they reach the driver. (asyncpg's type introspection on a
        connection's first use of a type reads neither.)"""
        sent = [*statements.statements, *driver_queries]
        tables = sum(bool(re.search(r"\b(orders|order_items)\b", q)) for q in sent)
        items = sum("order_items" in q for q in sent)
        return statements.count, tables, items

    start = cost()
    few = await order_batches(order_stub, user_id=ada.id, batch_size=5)
    middle = cost()
    many = await order_batches(order_stub, user_id=bob.id, batch_size=5)
    end = cost()

    assert [len(b.orders) for b in few] == [3]
    assert [len(b.orders) for b in many] == [5] * 12
    assert all(len(o.items) == o.id % 4 for o in orders_of(many))
    # One statement reads the orders (the streamed cursor); beside it, one items statement per
    # batch and nothing else that grows with the orders.
    assert [m - s for m, s in zip(middle, start, strict=True)] == [2, 2, 1]
    assert [e - m for e, m in zip(end, middle, strict=True)] == [13, 13, 12]


async def test_an_order_token_works_only_with_its_filters(
    order_stub: OrderStub, factory: Factory, engine: AsyncEngine
) -> None:
    ada, bob = await factory.user(), await factory.user()
    await insert_orders(engine, ada.id, 3, "paid")
    await insert_orders(engine, bob.id, 3, "paid")
    token = (await order_batches(order_stub, user_id=ada.id, batch_size=1))[0].resume_token
    paid = int(pb.ORDER_STATUS_PAID)
    for other in ({"user_id": bob.id}, {"user_id": 0}, {"user_id": ada.id, "status": paid}):
        failure = await stream_fails(
            order_stub.StreamOrders(orders_api.StreamOrdersRequest(resume_token=token, **other))
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, other
        assert failure.reason == "INVALID_ARGUMENT"
        assert "other filters" in failure.violations["resume_token"], other


async def test_page_tokens_and_other_exports_tokens_are_refused_by_stream_orders(
    order_stub: OrderStub,
    account_stub: AccountStub,
    user_stub: UserStub,
    factory: Factory,
    engine: AsyncEngine,
) -> None:
    user = await factory.user()
    await insert_orders(engine, user.id, 3, "pending")
    await insert_users(engine, 2)
    source, target = await factory.account(), await factory.account()
    await factory.transfer(source, target, "1.00")
    await factory.transfer(source, target, "1.00")

    batch = (await order_batches(order_stub, batch_size=1))[0]
    payload, signature = batch.resume_token.split(".")
    foreign = [
        f"{payload}.{'A' * len(signature)}",  # forged
        "garbage",
        (await order_stub.ListOrders(orders_api.ListOrdersRequest(page_size=1))).next_page_token,
        (
            await user_stub.StreamUsers(users_api.StreamUsersRequest(batch_size=1)).read()
        ).resume_token,
        (await transfer_batches(account_stub, account_id=source.id, batch_size=1))[0].resume_token,
    ]
    for token in foreign:
        assert token
        failure = await stream_fails(
            order_stub.StreamOrders(orders_api.StreamOrdersRequest(resume_token=token))
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, token
        assert "resume_token" in failure.violations, token


# --------------------------------------------------------------------------- StreamTransfers


async def statement_of(factory: Factory) -> tuple[Account, list[int]]:
    """An account with 13 transfers in and out, interleaved with transfers it is not part of.
    Returns it and its transfers' ids ascending."""
    mine, other, third = await factory.account(), await factory.account(), await factory.account()
    ids = []
    for n in range(13):
        if n % 3:
            ids.append((await factory.transfer(mine, other, f"{n}.{n:02d}")).id)
        else:
            ids.append((await factory.transfer(other, mine, "9999999999999999.99")).id)
        await factory.transfer(other, third, "0.01")  # not mine
    return mine, ids


async def test_stream_transfers_resumes_exactly_after_the_last_transfer_delivered(
    account_stub: AccountStub, factory: Factory
) -> None:
    account, ids = await statement_of(factory)
    whole = await transfer_batches(account_stub, account_id=account.id, batch_size=4)
    assert [len(b.transfers) for b in whole] == [4, 4, 4, 1]
    assert [t.id for t in transfers_of(whole)] == ids
    assert all(b.resume_token for b in whole)

    for n, batch in enumerate(whole):
        rest = await transfer_batches(
            account_stub, account_id=account.id, batch_size=5, resume_token=batch.resume_token
        )
        assert transfers_of(whole[: n + 1]) + transfers_of(rest) == transfers_of(whole), n
    last = whole[-1].resume_token
    assert await transfer_batches(account_stub, account_id=account.id, resume_token=last) == []

    # The same messages as ListTransfers (its own converter), newest first there.
    page = await account_stub.ListTransfers(
        accounts_api.ListTransfersRequest(account_id=account.id, page_size=100)
    )
    assert transfers_of(whole) == list(reversed(page.transfers))
    assert transfers_of(whole)[0].amount == "9999999999999999.99"
    assert transfers_of(whole)[1].amount == "1.01"


async def test_a_resumed_transfer_export_sees_transfers_written_since(
    account_stub: AccountStub, factory: Factory
) -> None:
    mine, other = await factory.account(), await factory.account()
    ids = [(await factory.transfer(mine, other, "1.00")).id for _ in range(3)]
    call = account_stub.StreamTransfers(
        accounts_api.StreamTransfersRequest(account_id=mine.id, batch_size=2)
    )
    first = await call.read()
    call.cancel()
    ids.append((await factory.transfer(other, mine, "2.50")).id)
    rest = await transfer_batches(
        account_stub, account_id=mine.id, batch_size=2, resume_token=first.resume_token
    )
    assert [[t.id for t in b.transfers] for b in rest] == [ids[2:]]
    assert rest[0].transfers[-1].amount == "2.50"


async def test_stream_transfers_refuses_tokens_of_other_accounts_pages_and_exports(
    account_stub: AccountStub, order_stub: OrderStub, factory: Factory, engine: AsyncEngine
) -> None:
    mine, other = await factory.account(), await factory.account()
    for _ in range(3):
        await factory.transfer(mine, other, "1.00")
    user = await factory.user()
    await insert_orders(engine, user.id, 2, "pending")

    token = (await transfer_batches(account_stub, account_id=mine.id, batch_size=1))[0].resume_token
    failure = await stream_fails(
        account_stub.StreamTransfers(
            accounts_api.StreamTransfersRequest(account_id=other.id, resume_token=token)
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "other filters" in failure.violations["resume_token"]

    list_page = await account_stub.ListTransfers(
        accounts_api.ListTransfersRequest(account_id=mine.id, page_size=1)
    )
    order_token = (await order_batches(order_stub, batch_size=1))[0].resume_token
    for foreign in (list_page.next_page_token, order_token, "garbage"):
        assert foreign
        failure = await stream_fails(
            account_stub.StreamTransfers(
                accounts_api.StreamTransfersRequest(account_id=mine.id, resume_token=foreign)
            )
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, foreign
        assert "resume_token" in failure.violations, foreign

    # And the other way round: an export's token is no ListTransfers page token.
    failure = await rpc_fails(
        account_stub.ListTransfers(
            accounts_api.ListTransfersRequest(account_id=mine.id, page_token=token)
        )
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in failure.violations
