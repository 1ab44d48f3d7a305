"""OrderService: convert the request, call the application (service/app/orders.py), convert."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from decimal import Decimal

from shop.v1 import order_service_pb2 as api
from shop.v1 import order_service_pb2_grpc as api_grpc
from shop.v1 import resources_pb2 as pb

from service.api.context import Context
from service.api.orders_convert import STATUS_FROM_PROTO, order_rows_to_batch, order_to_proto
from service.api.paging import PageTokens
from service.api.users_convert import user_to_proto
from service.api.validation import MAX_ID, Violations
from service.app.orders import ItemFields, Orders
from service.db.models import OrderStatus

MAX_ITEMS = 100
MAX_QUANTITY = 1_000_000
# orders.total is NUMERIC(18, 2): a larger sum would fail in the database as INTERNAL.
MAX_TOTAL = Decimal("9999999999999999.99")


def _status(v: Violations, field: str, value: int, *, required: bool) -> OrderStatus | None:
    if value == pb.ORDER_STATUS_UNSPECIFIED:
        if required:
            v.add(field, "must be a status other than ORDER_STATUS_UNSPECIFIED")
        return None
    status: OrderStatus | None = STATUS_FROM_PROTO.get(value)  # type: ignore[call-overload]
    if status is None:
        v.add(field, f"unknown status {value}")
    return status


def _filter(
    v: Violations, request: api.ListOrdersRequest | api.StreamOrdersRequest
) -> OrderStatus | None:
    """The user and the status that ListOrders and StreamOrders filter by; the status to ask
    the application for (None: any)."""
    if request.user_id < 0:
        v.add("user_id", "must be 0 (every user) or a positive id")
    return _status(v, "status", request.status, required=False)


def _items(v: Violations, items: Sequence[pb.OrderItem]) -> list[ItemFields]:
    if not items:
        v.add("items", "must hold at least one item")
    if len(items) > MAX_ITEMS:
        v.add("items", f"at most {MAX_ITEMS} items per order")
    fields = []
    # Only the first MAX_ITEMS are read (upb makes a Python object of an item when it is read:
    # list() of 8.4M empty items took 2 GB).
    for i, item in enumerate(items[:MAX_ITEMS]):
        sku = v.name(f"items[{i}].sku", item.sku, max_length=64)
        if not 0 < item.quantity <= MAX_QUANTITY:
            v.add(f"items[{i}].quantity", f"must be between 1 and {MAX_QUANTITY}")
        price = v.amount(f"items[{i}].unit_price", item.unit_price)
        fields.append(ItemFields(sku=sku, quantity=item.quantity, unit_price=price))
    if sum(i.unit_price * i.quantity for i in fields) > MAX_TOTAL:
        v.add("items", f"the order total must not exceed {MAX_TOTAL}")
    return fields


class OrderServicer(api_grpc.OrderServiceServicer):
    """Orders and their status life cycle."""

    def __init__(self, orders: Orders, tokens: PageTokens) -> None:
        self.orders = orders
        self.tokens = tokens

    async def CreateOrder(self, request: api.CreateOrderRequest, context: Context) -> pb.Order:
        """A PENDING order for a live user; idempotent by request_id."""
        v = Violations()
        v.id("user_id", request.user_id)
        items = _items(v, request.items)
        v.request_id("request_id", request.request_id)
        v.raise_if_any()
        return await self.orders.create(
            request.user_id,
            items,
            request=request,
            answer=order_to_proto,
            parse=pb.Order.FromString,
        )

    async def GetOrder(self, request: api.GetOrderRequest, context: Context) -> pb.Order:
        """The order with its user and items."""
        v = Violations()
        v.id("id", request.id)
        v.raise_if_any()
        order = await self.orders.get(request.id)
        return order_to_proto(order, user=user_to_proto(order.user))

    async def ListOrders(
        self, request: api.ListOrdersRequest, context: Context
    ) -> api.ListOrdersResponse:
        """A page of orders in id descending order."""
        v = Violations()
        status = _filter(v, request)
        limit = v.page_size("page_size", request.page_size)
        v.raise_if_any()
        filters = {"user_id": request.user_id, "status": int(request.status)}
        page, next_token = await self.tokens.page(
            request.page_token,
            filters,
            limit,
            fetch=lambda before_id, count: self.orders.page(
                before_id=before_id, limit=count, user_id=request.user_id, status=status
            ),
            start=MAX_ID,
        )
        return api.ListOrdersResponse(
            orders=[order_to_proto(o) for o in page], next_page_token=next_token
        )

    async def StreamOrders(
        self, request: api.StreamOrdersRequest, context: Context
    ) -> AsyncIterator[api.OrderBatch]:
        """Every matching order with its items, batch_size per message, from one consistent
        snapshot; each batch carries a resume token that starts a new export after its last
        order."""
        v = Violations()
        status = _filter(v, request)
        batch_size = v.batch_size("batch_size", request.batch_size)
        v.raise_if_any()
        # "export" keeps ListOrders page tokens and other exports' tokens from passing here.
        filters = {"export": "orders", "user_id": request.user_id, "status": int(request.status)}
        messages = self.tokens.export(
            request.resume_token,
            filters,
            batches=lambda after_id: self.orders.export(
                user_id=request.user_id, status=status, batch_size=batch_size, after_id=after_id
            ),
            last_key=lambda partition: partition.orders[-1].id,
            convert=order_rows_to_batch,
        )
        # Closed here, and with it the snapshot, even when the call ends at a yield.
        async with aclosing(messages):
            async for message in messages:
                yield message

    async def UpdateOrderStatus(
        self, request: api.UpdateOrderStatusRequest, context: Context
    ) -> pb.Order:
        """Move an order along its life cycle; INVALID_STATUS_TRANSITION otherwise."""
        v = Violations()
        v.id("id", request.id)
        target = _status(v, "status", request.status, required=True)
        v.raise_if_any()
        assert target is not None
        return order_to_proto(await self.orders.move(request.id, target))
