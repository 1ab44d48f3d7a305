"""Order model / Core row <-> shop.v1 Order, and the status enum mapping."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shop.v1 import resources_pb2 as pb
from sqlalchemy import inspect

from service.db.models import Order, OrderStatus
from service.handlers.convert import timestamp
from service.money import format_money

if TYPE_CHECKING:
    from service.db.models import User

STATUS_TO_PROTO: dict[OrderStatus, pb.OrderStatus.ValueType] = {
    OrderStatus.PENDING: pb.ORDER_STATUS_PENDING,
    OrderStatus.PAID: pb.ORDER_STATUS_PAID,
    OrderStatus.SHIPPED: pb.ORDER_STATUS_SHIPPED,
    OrderStatus.DELIVERED: pb.ORDER_STATUS_DELIVERED,
    OrderStatus.CANCELLED: pb.ORDER_STATUS_CANCELLED,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}


def order_to_proto(order: Order, *, user: User | None = None) -> pb.Order:
    from service.handlers.users_convert import user_to_proto

    return pb.Order(
        id=order.id,
        user_id=order.user_id,
        status=STATUS_TO_PROTO[OrderStatus(order.status)],
        items=[
            pb.OrderItem(sku=i.sku, quantity=i.quantity, unit_price=format_money(i.unit_price))
            for i in order.items
        ],
        total=format_money(order.total),
        created_at=timestamp(order.created_at),
        updated_at=timestamp(order.updated_at),
        user=user_to_proto(user) if user is not None else None,
        # Loaded only when the schema has it backfilled (repositories.orders.order_column_options).
        currency="" if "currency" in inspect(order).unloaded else order.currency,
    )


def order_rows_to_batch(rows: Sequence[Any]) -> list[pb.Order]:
    """Core rows from OrderRepository.stream (items as a JSON array) -> messages."""
    return [
        pb.Order(
            id=r.id,
            user_id=r.user_id,
            status=STATUS_TO_PROTO[OrderStatus(r.status)],
            items=[
                pb.OrderItem(sku=sku, quantity=quantity, unit_price=price)
                for sku, quantity, price in (
                    json.loads(r.items) if isinstance(r.items, str) else r.items
                )
            ],
            total=format_money(r.total),
            created_at=timestamp(r.created_at),
            updated_at=timestamp(r.updated_at),
            currency=r._mapping.get("currency") or "",
        )
        for r in rows
    ]
