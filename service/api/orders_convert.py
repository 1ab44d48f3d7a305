"""Order model / Core row <-> shop.v1 Order, and the status enum mapping."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shop.v1 import order_service_pb2 as api
from shop.v1 import resources_pb2 as pb

from service.amounts import format_money
from service.api.convert import set_timestamp, timestamp
from service.db.models import Order, OrderStatus

if TYPE_CHECKING:
    from service.app.orders import OrderPartition

STATUS_TO_PROTO: dict[OrderStatus, pb.OrderStatus.ValueType] = {
    OrderStatus.PENDING: pb.ORDER_STATUS_PENDING,
    OrderStatus.PAID: pb.ORDER_STATUS_PAID,
    OrderStatus.SHIPPED: pb.ORDER_STATUS_SHIPPED,
    OrderStatus.DELIVERED: pb.ORDER_STATUS_DELIVERED,
    OrderStatus.CANCELLED: pb.ORDER_STATUS_CANCELLED,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}
# orders.status as stored -> proto enum, one lookup per streamed order.
_STATUS_OF_COLUMN = {status.value: proto for status, proto in STATUS_TO_PROTO.items()}


def order_to_proto(order: Order, *, user: pb.User | None = None) -> pb.Order:
    """`user` comes converted (users_convert sits above this module: a user carries its orders,
    an order carries its user, and only one of the two may import the other)."""
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
        user=user,
        currency=order.loaded_currency(),
    )


def order_rows_to_batch(partition: OrderPartition, resume_token: str = "") -> api.OrderBatch:
    """A partition of OrderRepository.export -> one OrderBatch (the streaming hot path), filled
    in place like users_convert.user_rows_to_batch. Items arrive grouped by order in the orders'
    own id order, so one pass walks both. Money goes NUMERIC -> Decimal -> format_money, as in
    order_to_proto: the stream agrees with GetOrder byte for byte (the user aside)."""
    batch = api.OrderBatch(resume_token=resume_token)
    add = batch.orders.add
    items = partition.items
    n_items = len(items)
    i = 0
    for order_id, user_id, status, total, created, updated, currency in partition.orders:
        order = add()
        order.id = order_id
        order.user_id = user_id
        order.status = _STATUS_OF_COLUMN[status]
        add_item = order.items.add
        while i < n_items and items[i][0] == order_id:
            _, sku, quantity, unit_price = items[i]
            item = add_item()
            item.sku = sku
            item.quantity = quantity
            item.unit_price = format_money(unit_price)
            i += 1
        order.total = format_money(total)
        set_timestamp(order.created_at, created)
        set_timestamp(order.updated_at, updated)
        if currency:
            order.currency = currency
    return batch
