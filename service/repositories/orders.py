"""Orders with their items: create, load with explicit eager loads, keyset pages, exports."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import BigInteger, Select, any_, bindparam, null, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload, selectinload, undefer
from sqlalchemy.orm.strategy_options import _AbstractLoad  # what undefer() returns

from service.db.models import ORDER_CURRENCY, Order, OrderItem, OrderStatus
from service.db.schema_state import features_of
from service.db.streaming import Rows, epoch_microseconds, partitions, shielded
from service.errors import FailedPrecondition, NotFound

AnySelect = TypeVar("AnySelect", bound=Select[*tuple[Any, ...]])

# What StreamOrders sends of an order, in the order orders_convert.order_rows_to_batch unpacks
# it; currency is appended (or NULL) by OrderRepository.export, as the schema allows.
EXPORT_COLUMNS = (
    Order.id,
    Order.user_id,
    Order.status,
    Order.total,
    epoch_microseconds(Order.created_at).label("created_at"),
    epoch_microseconds(Order.updated_at).label("updated_at"),
)
# The items of a batch of orders, in one statement: grouped by order in the batch's (id) order,
# each order's in item id order (as Order.items is loaded for GetOrder). One array parameter,
# so one statement text (cached and prepared once) whatever the batch size.
EXPORT_ITEMS = (
    select(OrderItem.order_id, OrderItem.sku, OrderItem.quantity, OrderItem.unit_price)
    .where(OrderItem.order_id == any_(bindparam("order_ids", type_=ARRAY(BigInteger))))
    .order_by(OrderItem.order_id, OrderItem.id)
)


@dataclass(frozen=True, slots=True)
class ItemFields:
    sku: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True, slots=True)
class OrderPartition:
    """A batch of exported orders (EXPORT_COLUMNS, currency last) and the items of all of them
    (EXPORT_ITEMS' columns), both in order id order."""

    orders: Rows
    items: Rows


def order_column_options(session: AsyncSession) -> list[_AbstractLoad]:
    """Loader options for Order rows: currency (deferred in the model) is loaded only once the
    schema's backfill has run (SchemaFeatures); order_to_proto sends it when it is loaded."""
    return [undefer(Order.currency)] if features_of(session).read_order_currency else []


class OrderRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.features = features_of(session)

    async def add(self, user_id: int, items: Sequence[ItemFields]) -> Order:
        total = sum((i.unit_price * i.quantity for i in items), Decimal("0.00"))
        # Named only when the schema has the column: a build started on an older schema
        # leaves it to the column's DEFAULT (see alembic/versions/0003).
        rolled_out = {"currency": ORDER_CURRENCY} if self.features.write_order_currency else {}
        order = Order(
            user_id=user_id,
            status=OrderStatus.PENDING.value,
            total=total,
            items=[
                OrderItem(sku=i.sku, quantity=i.quantity, unit_price=i.unit_price) for i in items
            ],
            **rolled_out,
        )
        self.session.add(order)
        await self.session.flush()
        return order

    async def get(self, order_id: int, *, for_update: bool = False) -> Order:
        """The order with its user (joinedload, many-to-one) and items (selectinload)."""
        stmt = (
            select(Order)
            .where(Order.id == order_id)
            .options(
                joinedload(Order.user),
                selectinload(Order.items),
                *order_column_options(self.session),
            )
        )
        if for_update:
            stmt = stmt.with_for_update(of=Order)
        order = (await self.session.execute(stmt)).scalar_one_or_none()
        if order is None:
            raise NotFound("order", order_id)
        return order

    async def move(self, order_id: int, target: OrderStatus) -> Order:
        order = await self.get(order_id, for_update=True)
        current = OrderStatus(order.status)
        if current == target:
            return order  # a repeat: no write, so updated_at and the audit log stay as they are
        if not current.can_move_to(target):
            raise FailedPrecondition(
                f"order {order_id} cannot move from {current} to {target}",
                reason="INVALID_STATUS_TRANSITION",
                **{"from": current.name, "to": target.name},
            )
        order.status = target.value
        await self.session.flush()
        return order

    @staticmethod
    def _filtered(stmt: AnySelect, user_id: int, status: OrderStatus | None) -> AnySelect:
        if user_id:
            stmt = stmt.where(Order.user_id == user_id)
        if status is not None:
            stmt = stmt.where(Order.status == status.value)
        return stmt

    async def page(
        self, *, before_id: int, limit: int, user_id: int, status: OrderStatus | None
    ) -> Sequence[Order]:
        """Orders with id < before_id, descending (keyset pagination), items loaded."""
        stmt = (
            select(Order)
            .where(Order.id < before_id)
            .order_by(Order.id.desc())
            .limit(limit)
            .options(selectinload(Order.items), *order_column_options(self.session))
        )
        return (await self.session.scalars(self._filtered(stmt, user_id, status))).all()

    def export(
        self, *, user_id: int, status: OrderStatus | None, batch_size: int, after_id: int = 0
    ) -> AsyncIterator[OrderPartition]:
        """Matching orders with id > after_id, batch_size per partition, from a server-side
        cursor, each partition with its items (after_id resumes an export)."""
        currency = Order.currency if self.features.read_order_currency else null()
        stmt = select(*EXPORT_COLUMNS, currency.label("currency")).order_by(Order.id)
        stmt = self._filtered(stmt.where(Order.id > after_id), user_id, status)
        return self._with_items(partitions(self.session, stmt, batch_size))

    async def _with_items(
        self, batches: AsyncGenerator[Rows, None]
    ) -> AsyncIterator[OrderPartition]:
        """Each batch of orders with all its items, read by one statement per batch through the
        session, so on the export's connection and from its snapshot. Closing this closes the
        orders' stream (its result) at once."""
        async with aclosing(batches):
            async for orders in batches:
                order_ids = [order.id for order in orders]
                items = await shielded(self.session.execute(EXPORT_ITEMS, {"order_ids": order_ids}))
                yield OrderPartition(orders, items.all())
