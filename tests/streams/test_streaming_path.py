"""The three exports read their rows through SQLAlchemy's streaming results: a server-side
cursor (stream_results) fetched yield_per rows at a time, as our users were promised."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import account_service_pb2_grpc, order_service_pb2_grpc, user_service_pb2_grpc
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import user_service_pb2 as users_api
from sqlalchemy import event

from service.serving.server import RunningServer
from tests.factories import Factory

BATCH = 3


@dataclass(frozen=True)
class Executed:
    statement: str
    options: dict[str, Any]
    server_side: bool


@pytest.fixture
def executed(server: RunningServer) -> Iterator[list[Executed]]:
    """Every statement the serving engine runs, with the execution options it ran under."""
    seen: list[Executed] = []

    def record(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, *_: Any
    ) -> None:
        options = dict(context.execution_options)
        seen.append(Executed(statement, options, bool(context._is_server_side)))

    event.listen(server.engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(server.engine.sync_engine, "before_cursor_execute", record)


def selects_from(executed: list[Executed], table: str) -> list[Executed]:
    pattern = re.compile(rf"^\s*SELECT\b.*\bFROM {table}\b", re.DOTALL)
    return [e for e in executed if pattern.search(e.statement)]


def assert_streamed(executed: list[Executed], table: str) -> None:
    """Exactly one SELECT read the table, streamed from a server-side cursor BATCH rows a time."""
    [export] = selects_from(executed, table)
    assert export.options.get("yield_per") == BATCH, export.options
    assert export.options.get("stream_results") is True, export.options
    assert export.server_side


async def test_stream_users_reads_through_sqlalchemy_streaming(
    user_stub: user_service_pb2_grpc.UserServiceStub,
    factory: Factory,
    executed: list[Executed],
) -> None:
    for _ in range(BATCH + 1):
        await factory.user()
    batches = [
        b async for b in user_stub.StreamUsers(users_api.StreamUsersRequest(batch_size=BATCH))
    ]
    assert [len(b.users) for b in batches] == [BATCH, 1]
    assert_streamed(executed, "users")


async def test_stream_orders_reads_through_sqlalchemy_streaming(
    order_stub: order_service_pb2_grpc.OrderServiceStub,
    factory: Factory,
    executed: list[Executed],
) -> None:
    user = await factory.user()
    for _ in range(BATCH + 1):
        await factory.order(user, items=[("SKU", 1, "1.00")])
    executed.clear()  # the factory's writes run elsewhere; start from the export alone
    call = order_stub.StreamOrders(orders_api.StreamOrdersRequest(batch_size=BATCH))
    batches = [b async for b in call]
    assert [len(b.orders) for b in batches] == [BATCH, 1]
    assert_streamed(executed, "orders")
    # The items of each batch: one plain statement per batch, not a stream.
    items = selects_from(executed, "order_items")
    assert len(items) == 2
    assert not any(e.server_side for e in items)


async def test_stream_transfers_reads_through_sqlalchemy_streaming(
    account_stub: account_service_pb2_grpc.AccountServiceStub,
    factory: Factory,
    executed: list[Executed],
) -> None:
    source, target = await factory.account(), await factory.account()
    for _ in range(BATCH + 1):
        await factory.transfer(source, target, "1.00")
    call = account_stub.StreamTransfers(
        accounts_api.StreamTransfersRequest(account_id=source.id, batch_size=BATCH)
    )
    batches = [b async for b in call]
    assert [len(b.transfers) for b in batches] == [BATCH, 1]
    assert_streamed(executed, "transfers")
