"""OrderRepository's SQL on a real PostgreSQL session."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db.models import OrderStatus
from service.errors import FailedPrecondition, NotFound
from service.repositories.orders import ItemFields, OrderPartition, OrderRepository
from tests.factories import Factory


async def export(sessions: async_sessionmaker[AsyncSession], **kw: Any) -> list[OrderPartition]:
    """Every partition the export yields."""
    params = {"user_id": 0, "status": None, "batch_size": 500} | kw
    async with sessions() as session:
        return [p async for p in OrderRepository(session).export(**params)]


def items_of(partition: OrderPartition) -> list[tuple[int, str, int, str]]:
    """The partition's item rows in the order it sent them: (order_id, sku, quantity,
    unit_price as text, so its scale counts too)."""
    return [(i.order_id, i.sku, i.quantity, str(i.unit_price)) for i in partition.items]


async def test_export_items_are_in_item_id_order_not_insertion_order(
    factory: Factory, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await factory.user()
    order = await factory.order(user, items=[("FIRST", 1, "1.00")])
    async with engine.begin() as conn:
        # Inserted out of id order, so only the ORDER BY item id puts them in id order.
        for item_id, sku in ((1_000_030, "THIRTY"), (1_000_010, "TEN"), (1_000_020, "TWENTY")):
            await conn.execute(
                text(
                    "INSERT INTO order_items (id, order_id, sku, quantity, unit_price)"
                    " VALUES (:id, :order_id, :sku, 2, 0.10)"
                ),
                {"id": item_id, "order_id": order.id, "sku": sku},
            )

    (partition,) = await export(sessions)

    (row,) = partition.orders
    assert row.id == order.id
    assert items_of(partition) == [
        (order.id, "FIRST", 1, "1.00"),
        (order.id, "TEN", 2, "0.10"),
        (order.id, "TWENTY", 2, "0.10"),
        (order.id, "THIRTY", 2, "0.10"),
    ]


async def test_export_items_belong_to_their_own_order_and_empty_orders_get_none(
    factory: Factory, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await factory.user()
    one = await factory.order(user, items=[("A", 3, "0.10"), ("B", 1, "19.99")])
    empty = await factory.order(user, items=[("GONE", 1, "1.00")])
    two = await factory.order(user, items=[("C", 1, "9999999999999999.99")])
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM order_items WHERE order_id = :id"), {"id": empty.id})

    (partition,) = await export(sessions)

    by_id = {row.id: row for row in partition.orders}
    assert [row.id for row in partition.orders] == [one.id, empty.id, two.id]
    # Grouped by order in the batch's order; the empty order, between the two, has no rows.
    assert items_of(partition) == [
        (one.id, "A", 3, "0.10"),
        (one.id, "B", 1, "19.99"),
        (two.id, "C", 1, "9999999999999999.99"),
    ]
    assert by_id[one.id].total == Decimal("20.29")
    assert by_id[one.id].status == "pending"
    assert by_id[one.id].user_id == user.id


async def test_export_partitions_follow_batch_size_filters_and_after_id(
    factory: Factory, sessions: async_sessionmaker[AsyncSession]
) -> None:
    ada, bob = await factory.user(), await factory.user()
    ada_ids = [(await factory.order(ada)).id for _ in range(5)]
    bob_paid = [(await factory.order(bob, status=OrderStatus.PAID)).id for _ in range(3)]
    bob_pending = (await factory.order(bob)).id

    def ids(partitions: list[OrderPartition]) -> list[list[int]]:
        # Each partition carries the items of its own orders, and only those (one item each).
        for p in partitions:
            assert [i.order_id for i in p.items] == [o.id for o in p.orders]
        return [[o.id for o in p.orders] for p in partitions]

    partitions = ids(await export(sessions, batch_size=2))
    assert [len(p) for p in partitions] == [2, 2, 2, 2, 1]
    assert [i for p in partitions for i in p] == sorted([*ada_ids, *bob_paid, bob_pending])

    only_ada = ids(await export(sessions, user_id=ada.id, batch_size=4))
    assert only_ada == [ada_ids[:4], ada_ids[4:]]

    assert ids(await export(sessions, status=OrderStatus.PAID)) == [bob_paid]

    bob_and_pending = await export(sessions, user_id=bob.id, status=OrderStatus.PENDING)
    assert ids(bob_and_pending) == [[bob_pending]]

    assert await export(sessions, status=OrderStatus.DELIVERED) == []

    assert ids(await export(sessions, user_id=ada.id, after_id=ada_ids[2])) == [ada_ids[3:]]


async def test_add_computes_an_exact_total_and_keeps_item_order(
    factory: Factory, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await factory.user()
    async with sessions() as session, session.begin():
        order = await OrderRepository(session).add(
            user.id,
            [
                ItemFields("A", 3, Decimal("0.10")),
                ItemFields("B", 1, Decimal("19.99")),
            ],
        )
    assert order.total == Decimal("20.29")
    assert order.status == OrderStatus.PENDING.value
    assert order.created_at is not None
    async with engine.connect() as conn:
        total = (
            await conn.execute(
                text("SELECT total::text FROM orders WHERE id = :id"), {"id": order.id}
            )
        ).scalar_one()
        skus = (
            await conn.execute(
                text("SELECT sku FROM order_items WHERE order_id = :id ORDER BY id"),
                {"id": order.id},
            )
        ).scalars()
        assert list(skus) == ["A", "B"]
    assert total == "20.29"


async def test_get_loads_user_and_items(
    factory: Factory, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await factory.user()
    created = await factory.order(user, items=[("X", 1, "1.00"), ("Y", 2, "2.00")])
    async with sessions() as session:
        order = await OrderRepository(session).get(created.id)
        # Relationships are lazy="raise": these reads only work because get() loaded them.
        assert order.user.id == user.id
        assert [i.sku for i in order.items] == ["X", "Y"]


async def test_get_unknown_raises_not_found(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        with pytest.raises(NotFound) as caught:
            await OrderRepository(session).get(31337)
    assert caught.value.reason == "ORDER_NOT_FOUND"


async def test_page_is_keyset_descending_with_items(
    factory: Factory, sessions: async_sessionmaker[AsyncSession]
) -> None:
    ada, bob = await factory.user(), await factory.user()
    ids = [(await factory.order(ada if n % 3 else bob)).id for n in range(6)]
    async with sessions() as session:
        repo = OrderRepository(session)
        first = await repo.page(before_id=2**63 - 1, limit=4, user_id=0, status=None)
        rest = await repo.page(before_id=first[-1].id, limit=4, user_id=0, status=None)
        only_ada = await repo.page(before_id=2**63 - 1, limit=10, user_id=ada.id, status=None)
        assert [o.id for o in first] == ids[::-1][:4]
        assert [o.id for o in rest] == ids[::-1][4:]
        assert [o.id for o in only_ada] == [i for n, i in enumerate(ids) if n % 3][::-1]
        assert all([i.sku for i in o.items] == ["SKU-1"] for o in first)


async def test_move_rejects_a_disallowed_transition_and_leaves_the_row(
    factory: Factory, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await factory.user()
    order = await factory.order(user, status=OrderStatus.SHIPPED)
    async with sessions() as session, session.begin():
        with pytest.raises(FailedPrecondition) as caught:
            await OrderRepository(session).move(order.id, OrderStatus.CANCELLED)
    assert caught.value.reason == "INVALID_STATUS_TRANSITION"
    assert caught.value.metadata == {"from": "SHIPPED", "to": "CANCELLED"}
    async with engine.connect() as conn:
        status = (
            await conn.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": order.id})
        ).scalar_one()
    assert status == "shipped"
