"""OrderService over the real gRPC channel against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import grpc
import pytest
from shop.v1 import order_service_pb2 as api
from shop.v1 import resources_pb2 as pb
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import OrderStatus
from tests.factories import Factory
from tests.rpc import RpcFailure, rpc_fails, stream_fails

DOMAIN = "shop.v1"

PENDING = pb.ORDER_STATUS_PENDING
PAID = pb.ORDER_STATUS_PAID
SHIPPED = pb.ORDER_STATUS_SHIPPED
DELIVERED = pb.ORDER_STATUS_DELIVERED
CANCELLED = pb.ORDER_STATUS_CANCELLED

# The life cycle from the contract (resources.proto).
ALLOWED = {
    (PENDING, PAID),
    (PAID, SHIPPED),
    (SHIPPED, DELIVERED),
    (PENDING, CANCELLED),
    (PAID, CANCELLED),
}
ALL_STATUSES = (PENDING, PAID, SHIPPED, DELIVERED, CANCELLED)
DISALLOWED = sorted(
    (a, b) for a in ALL_STATUSES for b in ALL_STATUSES if a != b and (a, b) not in ALLOWED
)
DB_STATUS = {
    PENDING: OrderStatus.PENDING,
    PAID: OrderStatus.PAID,
    SHIPPED: OrderStatus.SHIPPED,
    DELIVERED: OrderStatus.DELIVERED,
    CANCELLED: OrderStatus.CANCELLED,
}


def line(sku: str, quantity: int, unit_price: str) -> pb.OrderItem:
    return pb.OrderItem(sku=sku, quantity=quantity, unit_price=unit_price)


def create_request(user_id: int, request_id: str = "req-1", **kw: Any) -> api.CreateOrderRequest:
    items = kw.pop("items", [line("APPLE", 3, "0.10"), line("BOOK", 1, "19.99")])
    return api.CreateOrderRequest(user_id=user_id, items=items, request_id=request_id, **kw)


def assert_invalid(failure: RpcFailure, *fields: str) -> None:
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_ARGUMENT"
    assert failure.domain == DOMAIN
    for name in fields:
        assert name in failure.violations, failure.violations
        assert failure.violations[name]


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def written_rows(engine: AsyncEngine) -> dict[str, int]:
    """What order writes leave behind (users come from the factory, so they are not counted)."""
    return {
        "orders": await scalar(engine, "SELECT count(*) FROM orders"),
        "order_items": await scalar(engine, "SELECT count(*) FROM order_items"),
        "idempotency_keys": await scalar(engine, "SELECT count(*) FROM idempotency_keys"),
        "audit_log": await scalar(
            engine, "SELECT count(*) FROM audit_log WHERE table_name = 'orders'"
        ),
    }


NOTHING_WRITTEN = {"orders": 0, "order_items": 0, "idempotency_keys": 0, "audit_log": 0}


async def insert_orders(
    engine: AsyncEngine, user_id: int, count: int, status: OrderStatus = OrderStatus.PENDING
) -> list[int]:
    """`count` orders in one INSERT, each with lines ("A-<id>", 3, 0.10) and ("B-<id>", 1, 19.99)
    in that id order; returns the order ids ascending."""
    async with engine.begin() as conn:
        rows = await conn.execute(
            text(
                """
                WITH o AS (
                    INSERT INTO orders (user_id, status, total, currency)
                    SELECT :user_id, :status, 20.29, 'EUR' FROM generate_series(1, :count)
                    RETURNING id
                ), i AS (
                    INSERT INTO order_items (order_id, sku, quantity, unit_price)
                    SELECT id, 'A-' || id, 3, 0.10 FROM o
                    UNION ALL
                    SELECT id, 'B-' || id, 1, 19.99 FROM o
                )
                SELECT id FROM o ORDER BY id
                """
            ),
            {"user_id": user_id, "status": status.value, "count": count},
        )
        return list(rows.scalars())


def expected_bulk_items(order_id: int) -> list[pb.OrderItem]:
    return [line(f"A-{order_id}", 3, "0.10"), line(f"B-{order_id}", 1, "19.99")]


async def drain(call: Any) -> list[api.OrderBatch]:
    return [batch async for batch in call]


# --------------------------------------------------------------------------- CreateOrder


async def test_create_order_returns_pending_order_with_exact_total(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    items = [line("APPLE", 3, "0.10"), line("BOOK", 1, "19.99"), line("PEN", 2, "5")]

    order = await order_stub.CreateOrder(create_request(user.id, items=items))

    assert order.id > 0
    assert order.user_id == user.id
    assert order.status == PENDING
    assert order.total == "30.29"
    assert list(order.items) == [
        line("APPLE", 3, "0.10"),
        line("BOOK", 1, "19.99"),
        line("PEN", 2, "5.00"),
    ]
    assert order.created_at.seconds > 0
    assert order.updated_at.seconds > 0
    assert not order.HasField("user")
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT user_id, status, total::text AS total FROM orders WHERE id = :id"),
                {"id": order.id},
            )
        ).one()
        lines = (
            await conn.execute(
                text(
                    "SELECT sku, quantity, unit_price::text FROM order_items"
                    " WHERE order_id = :id ORDER BY id"
                ),
                {"id": order.id},
            )
        ).all()
    assert (row.user_id, row.status, row.total) == (user.id, "pending", "30.29")
    assert [tuple(r) for r in lines] == [
        ("APPLE", 3, "0.10"),
        ("BOOK", 1, "19.99"),
        ("PEN", 2, "5.00"),
    ]


async def test_create_order_total_has_no_float_error(order_stub, factory: Factory) -> None:
    user = await factory.user()
    order = await order_stub.CreateOrder(
        create_request(user.id, items=[line("A", 3, "0.10"), line("B", 1, "19.99")])
    )
    assert order.total == "20.29"
    big = await order_stub.CreateOrder(
        create_request(
            user.id,
            request_id="req-big",
            items=[line("A", 1_000_000, "9999999.99"), line("B", 7, "0.01")],
        )
    )
    assert big.total == "9999999990000.07"


async def test_create_order_then_get_returns_the_same_order(order_stub, factory: Factory) -> None:
    user = await factory.user()
    created = await order_stub.CreateOrder(create_request(user.id))
    fetched = await order_stub.GetOrder(api.GetOrderRequest(id=created.id))
    fetched.ClearField("user")
    assert fetched == created


async def test_create_order_retry_returns_identical_order_and_writes_once(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    request = create_request(user.id, request_id="retry-me")

    first = await order_stub.CreateOrder(request)
    second = await order_stub.CreateOrder(request)

    assert second == first
    assert await written_rows(engine) == {
        "orders": 1,
        "order_items": 2,
        "idempotency_keys": 1,
        "audit_log": 1,
    }


async def test_create_order_concurrent_identical_requests_create_one_order(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    request = create_request(user.id, request_id="burst-1")

    orders = await asyncio.gather(*(order_stub.CreateOrder(request) for _ in range(8)))

    assert all(o == orders[0] for o in orders)
    assert orders[0].total == "20.29"
    assert await written_rows(engine) == {
        "orders": 1,
        "order_items": 2,
        "idempotency_keys": 1,
        "audit_log": 1,
    }
    assert await scalar(engine, "SELECT id FROM orders") == orders[0].id


async def test_create_order_same_request_id_other_request_is_already_exists(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    first = await order_stub.CreateOrder(create_request(user.id, request_id="dup"))

    failure = await rpc_fails(
        order_stub.CreateOrder(
            create_request(user.id, request_id="dup", items=[line("OTHER", 1, "1.00")])
        )
    )

    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "REQUEST_ID_REUSED"
    assert failure.domain == DOMAIN
    assert failure.metadata.get("request_id") == "dup"
    assert await scalar(engine, "SELECT count(*) FROM orders") == 1
    assert await scalar(engine, "SELECT count(*) FROM order_items") == 2
    # The original is untouched and a correct retry still gets it.
    assert await order_stub.CreateOrder(create_request(user.id, request_id="dup")) == first


async def test_create_order_same_request_id_other_user_is_already_exists(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    ada, bob = await factory.user(), await factory.user()
    await order_stub.CreateOrder(create_request(ada.id, request_id="shared"))
    failure = await rpc_fails(order_stub.CreateOrder(create_request(bob.id, request_id="shared")))
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.reason == "REQUEST_ID_REUSED"
    assert await scalar(engine, "SELECT count(*) FROM orders WHERE user_id = :u", u=bob.id) == 0


@pytest.mark.parametrize(
    ("request_id", "description"),
    [
        ("", "missing"),
        ("has space", "space"),
        ("x" * 129, "too long"),
        ("ünïcode", "non-ascii"),
        ("a/b", "slash"),
    ],
)
async def test_create_order_rejects_bad_request_id(
    order_stub, factory: Factory, engine: AsyncEngine, request_id: str, description: str
) -> None:
    user = await factory.user()
    failure = await rpc_fails(order_stub.CreateOrder(create_request(user.id, request_id)))
    assert_invalid(failure, "request_id")
    assert set(failure.violations) == {"request_id"}, description
    assert await written_rows(engine) == NOTHING_WRITTEN


async def test_create_order_accepts_longest_request_id(order_stub, factory: Factory) -> None:
    user = await factory.user()
    order = await order_stub.CreateOrder(create_request(user.id, "A-z0.9_:" * 16))
    assert order.id > 0


async def test_create_order_rejects_no_items(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    failure = await rpc_fails(order_stub.CreateOrder(create_request(user.id, items=[])))
    assert_invalid(failure, "items")
    assert set(failure.violations) == {"items"}
    assert await written_rows(engine) == NOTHING_WRITTEN


async def test_create_order_rejects_too_many_items(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    items = [line(f"SKU-{n}", 1, "1.00") for n in range(101)]
    failure = await rpc_fails(order_stub.CreateOrder(create_request(user.id, items=items)))
    assert_invalid(failure, "items")
    assert await written_rows(engine) == NOTHING_WRITTEN


@pytest.mark.parametrize("quantity", [0, -1, -(2**31), 1_000_001])
async def test_create_order_rejects_bad_quantity(
    order_stub, factory: Factory, engine: AsyncEngine, quantity: int
) -> None:
    user = await factory.user()
    items = [line("OK", 1, "1.00"), line("BAD", quantity, "1.00")]
    failure = await rpc_fails(order_stub.CreateOrder(create_request(user.id, items=items)))
    assert_invalid(failure, "items[1].quantity")
    assert set(failure.violations) == {"items[1].quantity"}
    assert await written_rows(engine) == NOTHING_WRITTEN


@pytest.mark.parametrize(
    "unit_price",
    [
        "1.234",
        "-1",
        "abc",
        "",
        "0",
        "0.00",
        "1e3",
        " 1.00",
        "1,00",
        "NaN",
        "Infinity",
        "+1",
        ".5",
        "١٢",
        "12345678901234567",
    ],
)
async def test_create_order_rejects_bad_unit_price(
    order_stub, factory: Factory, engine: AsyncEngine, unit_price: str
) -> None:
    user = await factory.user()
    failure = await rpc_fails(
        order_stub.CreateOrder(create_request(user.id, items=[line("A", 1, unit_price)]))
    )
    assert_invalid(failure, "items[0].unit_price")
    assert set(failure.violations) == {"items[0].unit_price"}
    assert await written_rows(engine) == NOTHING_WRITTEN


async def test_create_order_total_beyond_numeric_18_2_is_invalid_argument(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    items = [line("A", 1, "9999999999999999.99"), line("B", 1, "0.01")]
    failure = await rpc_fails(order_stub.CreateOrder(create_request(user.id, items=items)))
    assert_invalid(failure, "items")
    assert set(failure.violations) == {"items"}
    failure = await rpc_fails(
        order_stub.CreateOrder(create_request(user.id, items=[line("A", 2, "9999999999999999.99")]))
    )
    assert_invalid(failure, "items")
    assert await written_rows(engine) == NOTHING_WRITTEN


async def test_create_order_total_at_the_numeric_18_2_limit_is_accepted(
    order_stub, factory: Factory
) -> None:
    user = await factory.user()
    items = [line("A", 1, "9999999999999999.98"), line("B", 1, "0.01")]
    order = await order_stub.CreateOrder(create_request(user.id, items=items))
    assert order.total == "9999999999999999.99"


@pytest.mark.parametrize("sku", ["", "   ", "x" * 65, "bad\nsku"])
async def test_create_order_rejects_bad_sku(
    order_stub, factory: Factory, engine: AsyncEngine, sku: str
) -> None:
    user = await factory.user()
    failure = await rpc_fails(
        order_stub.CreateOrder(create_request(user.id, items=[line(sku, 1, "1.00")]))
    )
    assert_invalid(failure, "items[0].sku")
    assert await written_rows(engine) == NOTHING_WRITTEN


async def test_create_order_reports_every_violation_at_once(
    order_stub, engine: AsyncEngine
) -> None:
    request = api.CreateOrderRequest(
        user_id=0,
        items=[line("A", 0, "1.234"), line("", 1, "abc")],
        request_id="",
    )
    failure = await rpc_fails(order_stub.CreateOrder(request))
    assert_invalid(
        failure,
        "user_id",
        "items[0].quantity",
        "items[0].unit_price",
        "items[1].sku",
        "items[1].unit_price",
        "request_id",
    )
    assert len(failure.violations) == 6
    assert await written_rows(engine) == NOTHING_WRITTEN


@pytest.mark.parametrize("user_id", [0, -5])
async def test_create_order_rejects_bad_user_id(
    order_stub, engine: AsyncEngine, user_id: int
) -> None:
    failure = await rpc_fails(order_stub.CreateOrder(create_request(user_id)))
    assert_invalid(failure, "user_id")
    assert await written_rows(engine) == NOTHING_WRITTEN


async def test_create_order_unknown_user_is_not_found(order_stub, engine: AsyncEngine) -> None:
    failure = await rpc_fails(order_stub.CreateOrder(create_request(424242)))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "USER_NOT_FOUND"
    assert failure.domain == DOMAIN
    assert failure.metadata.get("id") == "424242"
    assert await written_rows(engine) == NOTHING_WRITTEN


async def test_create_order_for_deleted_user_is_failed_precondition(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user(deleted=True)
    failure = await rpc_fails(order_stub.CreateOrder(create_request(user.id)))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "USER_DELETED"
    assert failure.domain == DOMAIN
    assert await written_rows(engine) == NOTHING_WRITTEN


async def test_create_order_failed_request_id_is_not_burnt(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    """A request that failed wrote nothing, so its request_id stays free for a corrected retry."""
    failure = await rpc_fails(order_stub.CreateOrder(create_request(424242, request_id="k")))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    user = await factory.user()
    order = await order_stub.CreateOrder(create_request(user.id, request_id="k"))
    assert order.user_id == user.id
    assert await scalar(engine, "SELECT count(*) FROM orders") == 1


# --------------------------------------------------------------------------- GetOrder


async def test_get_order_returns_user_and_items(order_stub, factory: Factory) -> None:
    user = await factory.user(first_name="Grace", last_name="Hopper")
    order = await factory.order(
        user, status=OrderStatus.PAID, items=[("Z", 1, "3.00"), ("A", 2, "0.50")]
    )

    fetched = await order_stub.GetOrder(api.GetOrderRequest(id=order.id))

    assert fetched.id == order.id
    assert fetched.user_id == user.id
    assert fetched.status == PAID
    assert fetched.total == "4.00"
    assert list(fetched.items) == [line("Z", 1, "3.00"), line("A", 2, "0.50")]
    assert fetched.user.id == user.id
    assert fetched.user.email == user.email
    assert fetched.user.full_name == "Grace Hopper"
    assert not fetched.user.HasField("deleted_at")


async def test_get_order_of_deleted_user_still_shows_the_user(order_stub, factory: Factory) -> None:
    user = await factory.user(deleted=True)
    order = await factory.order(user)
    fetched = await order_stub.GetOrder(api.GetOrderRequest(id=order.id))
    assert fetched.user.id == user.id
    assert fetched.user.HasField("deleted_at")


async def test_get_order_statement_count_does_not_depend_on_items(
    order_stub, factory: Factory, statements
) -> None:
    user = await factory.user()
    small = await factory.order(user, items=[("ONE", 1, "1.00")])
    large = await factory.order(user, items=[(f"SKU-{n}", 1, "1.00") for n in range(50)])
    await order_stub.GetOrder(api.GetOrderRequest(id=small.id))  # warm up the pool

    before = statements.count
    got_small = await order_stub.GetOrder(api.GetOrderRequest(id=small.id))
    small_count = statements.count - before
    before = statements.count
    got_large = await order_stub.GetOrder(api.GetOrderRequest(id=large.id))
    large_count = statements.count - before

    assert len(got_small.items) == 1
    assert len(got_large.items) == 50
    assert [i.sku for i in got_large.items] == [f"SKU-{n}" for n in range(50)]
    assert got_large.user.id == user.id
    # The order joined to its user, then one query for the items: never one per item, and
    # never 0 (every statement runs through SQLAlchemy, whose hook counts it).
    assert small_count == large_count == 2, statements.statements[-large_count:]


async def test_get_order_unknown_is_not_found(order_stub) -> None:
    failure = await rpc_fails(order_stub.GetOrder(api.GetOrderRequest(id=987654)))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "ORDER_NOT_FOUND"
    assert failure.domain == DOMAIN
    assert failure.metadata.get("id") == "987654"


@pytest.mark.parametrize("order_id", [0, -1])
async def test_get_order_rejects_bad_id(order_stub, order_id: int) -> None:
    failure = await rpc_fails(order_stub.GetOrder(api.GetOrderRequest(id=order_id)))
    assert_invalid(failure, "id")


# --------------------------------------------------------------------------- ListOrders


async def list_all(order_stub, **request: Any) -> tuple[list[int], int]:
    """Every page of ListOrders: the ids in order and how many pages it took."""
    ids: list[int] = []
    token = ""
    pages = 0
    while True:
        reply = await order_stub.ListOrders(api.ListOrdersRequest(page_token=token, **request))
        pages += 1
        ids.extend(o.id for o in reply.orders)
        token = reply.next_page_token
        if not token:
            return ids, pages
        assert pages < 1000, "paging does not end"


async def test_list_orders_pages_in_id_descending_order(order_stub, factory: Factory) -> None:
    ada, bob = await factory.user(), await factory.user()
    ids = [(await factory.order(ada if n % 2 else bob)).id for n in range(7)]

    first = await order_stub.ListOrders(api.ListOrdersRequest(page_size=3))
    assert [o.id for o in first.orders] == ids[::-1][:3]
    assert first.next_page_token
    second = await order_stub.ListOrders(
        api.ListOrdersRequest(page_size=3, page_token=first.next_page_token)
    )
    assert [o.id for o in second.orders] == ids[::-1][3:6]
    third = await order_stub.ListOrders(
        api.ListOrdersRequest(page_size=3, page_token=second.next_page_token)
    )
    assert [o.id for o in third.orders] == ids[::-1][6:]
    assert third.next_page_token == ""


async def test_list_orders_exact_pages_end_without_an_empty_page(
    order_stub, factory: Factory
) -> None:
    user = await factory.user()
    ids = [(await factory.order(user)).id for _ in range(4)]
    listed, pages = await list_all(order_stub, page_size=2)
    assert listed == ids[::-1]
    assert pages == 2


async def test_list_orders_includes_items_and_fields(order_stub, factory: Factory) -> None:
    user = await factory.user()
    order = await factory.order(
        user, status=OrderStatus.SHIPPED, items=[("B", 2, "1.25"), ("A", 1, "0.05")]
    )
    reply = await order_stub.ListOrders(api.ListOrdersRequest())
    assert len(reply.orders) == 1
    listed = reply.orders[0]
    assert listed.id == order.id
    assert listed.user_id == user.id
    assert listed.status == SHIPPED
    assert listed.total == "2.55"
    assert list(listed.items) == [line("B", 2, "1.25"), line("A", 1, "0.05")]
    assert not listed.HasField("user")


async def test_list_orders_user_filter_and_zero_means_every_user(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    ada, bob = await factory.user(), await factory.user()
    ada_ids = await insert_orders(engine, ada.id, 5)
    bob_ids = await insert_orders(engine, bob.id, 4)

    everyone, _ = await list_all(order_stub, user_id=0, page_size=3)
    assert everyone == sorted(ada_ids + bob_ids, reverse=True)
    only_ada, _ = await list_all(order_stub, user_id=ada.id, page_size=3)
    assert only_ada == ada_ids[::-1]
    only_bob, _ = await list_all(order_stub, user_id=bob.id, page_size=3)
    assert only_bob == bob_ids[::-1]
    nobody, pages = await list_all(order_stub, user_id=424242)
    assert (nobody, pages) == ([], 1)


async def test_list_orders_status_filter(order_stub, factory: Factory, engine: AsyncEngine) -> None:
    ada, bob = await factory.user(), await factory.user()
    paid = await insert_orders(engine, ada.id, 3, OrderStatus.PAID)
    await insert_orders(engine, ada.id, 2, OrderStatus.PENDING)
    bob_paid = await insert_orders(engine, bob.id, 2, OrderStatus.PAID)
    await insert_orders(engine, bob.id, 1, OrderStatus.CANCELLED)

    listed, _ = await list_all(order_stub, status=PAID, page_size=2)
    assert listed == sorted(paid + bob_paid, reverse=True)
    ada_paid, _ = await list_all(order_stub, user_id=ada.id, status=PAID, page_size=2)
    assert ada_paid == paid[::-1]
    reply = await order_stub.ListOrders(api.ListOrdersRequest(status=PAID))
    assert {o.status for o in reply.orders} == {PAID}
    delivered, _ = await list_all(order_stub, status=DELIVERED)
    assert delivered == []


async def test_list_orders_page_size_zero_means_fifty(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    ids = await insert_orders(engine, user.id, 51)
    reply = await order_stub.ListOrders(api.ListOrdersRequest(page_size=0))
    assert [o.id for o in reply.orders] == ids[::-1][:50]
    assert reply.next_page_token
    rest = await order_stub.ListOrders(api.ListOrdersRequest(page_token=reply.next_page_token))
    assert [o.id for o in rest.orders] == [ids[0]]
    assert rest.next_page_token == ""


async def test_list_orders_page_size_is_capped_at_a_thousand(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    ids = await insert_orders(engine, user.id, 1001)
    reply = await order_stub.ListOrders(api.ListOrdersRequest(page_size=2**31 - 1))
    assert [o.id for o in reply.orders] == ids[::-1][:1000]
    assert reply.next_page_token
    rest = await order_stub.ListOrders(
        api.ListOrdersRequest(page_size=1001, page_token=reply.next_page_token)
    )
    assert [o.id for o in rest.orders] == [ids[0]]
    assert rest.next_page_token == ""


@pytest.mark.parametrize("page_size", [-1, -(2**31)])
async def test_list_orders_rejects_negative_page_size(order_stub, page_size: int) -> None:
    failure = await rpc_fails(order_stub.ListOrders(api.ListOrdersRequest(page_size=page_size)))
    assert_invalid(failure, "page_size")


async def test_list_orders_rejects_negative_user_id_and_unknown_status(order_stub) -> None:
    failure = await rpc_fails(order_stub.ListOrders(api.ListOrdersRequest(user_id=-1, status=99)))
    assert_invalid(failure, "user_id", "status")


async def first_token(order_stub, factory: Factory, **request: Any) -> str:
    user = await factory.user()
    for _ in range(3):
        await factory.order(user)
    reply = await order_stub.ListOrders(api.ListOrdersRequest(page_size=1, **request))
    assert reply.next_page_token
    return reply.next_page_token


@pytest.mark.parametrize(
    "other",
    [{"user_id": 1}, {"status": PENDING}, {"user_id": 1, "status": PAID}],
)
async def test_list_orders_token_is_bound_to_its_filters(
    order_stub, factory: Factory, other: dict[str, int]
) -> None:
    token = await first_token(order_stub, factory)
    failure = await rpc_fails(
        order_stub.ListOrders(api.ListOrdersRequest(page_size=1, page_token=token, **other))
    )
    assert_invalid(failure, "page_token")


async def test_list_orders_token_survives_a_page_size_change(order_stub, factory: Factory) -> None:
    token = await first_token(order_stub, factory)
    reply = await order_stub.ListOrders(api.ListOrdersRequest(page_size=10, page_token=token))
    assert len(reply.orders) == 2


def tampered_tokens(token: str) -> list[str]:
    payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["k"] += 1000
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    return [
        f"{forged}.{signature}",  # payload changed, old signature
        f"{payload}.{flipped}",  # signature changed
        payload,  # signature dropped
        f"{token}.extra",
        "not-a-token",
        "!!!.???",
        token[:-3],
    ]


async def test_list_orders_rejects_tampered_tokens(order_stub, factory: Factory) -> None:
    token = await first_token(order_stub, factory)
    for bad in tampered_tokens(token):
        failure = await rpc_fails(
            order_stub.ListOrders(api.ListOrdersRequest(page_size=1, page_token=bad))
        )
        assert_invalid(failure, "page_token")


async def test_list_orders_statement_count_does_not_grow_with_the_page(
    order_stub, factory: Factory, engine: AsyncEngine, statements
) -> None:
    user = await factory.user()
    await insert_orders(engine, user.id, 40)
    await order_stub.ListOrders(api.ListOrdersRequest(page_size=1))  # warm up the pool

    before = statements.count
    small = await order_stub.ListOrders(api.ListOrdersRequest(page_size=5))
    small_count = statements.count - before
    before = statements.count
    large = await order_stub.ListOrders(api.ListOrdersRequest(page_size=40))
    large_count = statements.count - before

    assert len(small.orders) == 5
    assert len(large.orders) == 40
    assert all(list(o.items) == expected_bulk_items(o.id) for o in large.orders)
    # The page, then one query for every item on it (a count of 0 would mean the hook missed
    # the statements: every one runs through SQLAlchemy).
    assert small_count == large_count == 2, statements.statements[-large_count:]


# --------------------------------------------------------------------------- StreamOrders


async def test_stream_orders_sends_every_order_once_in_batches(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    ids = await insert_orders(engine, user.id, 1200)

    batches = await drain(order_stub.StreamOrders(api.StreamOrdersRequest(batch_size=500)))

    assert [len(b.orders) for b in batches] == [500, 500, 200]
    streamed = [o for b in batches for o in b.orders]
    assert [o.id for o in streamed] == ids
    for order in streamed:
        assert order.user_id == user.id
        assert order.status == PENDING
        assert order.total == "20.29"
        assert list(order.items) == expected_bulk_items(order.id)
        assert order.created_at.seconds > 0
        assert order.updated_at.seconds > 0


async def test_stream_orders_items_are_exact(order_stub, factory: Factory) -> None:
    user = await factory.user()
    full = await factory.order(
        user,
        items=[("ZED", 7, "0.10"), ("ALPHA", 1, "19.99"), ("BIG", 1, "9999999999999.99")],
    )
    whole = await factory.order(user, items=[("ONE", 1, "1")])

    batches = await drain(order_stub.StreamOrders(api.StreamOrdersRequest()))

    streamed = {o.id: o for b in batches for o in b.orders}
    assert list(streamed[full.id].items) == [
        line("ZED", 7, "0.10"),
        line("ALPHA", 1, "19.99"),
        line("BIG", 1, "9999999999999.99"),
    ]
    assert streamed[full.id].total == "10000000000020.68"
    assert list(streamed[whole.id].items) == [line("ONE", 1, "1.00")]
    assert streamed[whole.id].total == "1.00"
    # The stream agrees with GetOrder on every field but the user.
    fetched = await order_stub.GetOrder(api.GetOrderRequest(id=full.id))
    fetched.ClearField("user")
    assert streamed[full.id] == fetched


async def test_stream_orders_default_batch_size_is_500(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    await insert_orders(engine, user.id, 501)
    batches = await drain(order_stub.StreamOrders(api.StreamOrdersRequest(batch_size=0)))
    assert [len(b.orders) for b in batches] == [500, 1]


async def test_stream_orders_batch_size_is_capped_at_5000(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    await insert_orders(engine, user.id, 5001)
    batches = await drain(order_stub.StreamOrders(api.StreamOrdersRequest(batch_size=2**31 - 1)))
    assert [len(b.orders) for b in batches] == [5000, 1]


async def test_stream_orders_of_nothing_sends_no_orders(order_stub) -> None:
    batches = await drain(order_stub.StreamOrders(api.StreamOrdersRequest(batch_size=10)))
    assert [o for b in batches for o in b.orders] == []


async def test_stream_orders_filters_by_user_and_status(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    ada, bob = await factory.user(), await factory.user()
    ada_pending = await insert_orders(engine, ada.id, 4)
    ada_paid = await insert_orders(engine, ada.id, 3, OrderStatus.PAID)
    bob_pending = await insert_orders(engine, bob.id, 2)
    bob_paid = await insert_orders(engine, bob.id, 5, OrderStatus.PAID)

    async def streamed(**request: Any) -> list[int]:
        batches = await drain(order_stub.StreamOrders(api.StreamOrdersRequest(**request)))
        return [o.id for b in batches for o in b.orders]

    assert await streamed(batch_size=3) == sorted(ada_pending + ada_paid + bob_pending + bob_paid)
    assert await streamed(user_id=ada.id, batch_size=2) == ada_pending + ada_paid
    assert await streamed(status=PAID, batch_size=2) == ada_paid + bob_paid
    assert await streamed(user_id=bob.id, status=PENDING) == bob_pending
    assert await streamed(user_id=bob.id, status=SHIPPED) == []
    assert await streamed(user_id=424242) == []


async def test_stream_orders_statement_count_does_not_grow_with_orders(
    order_stub, factory: Factory, engine: AsyncEngine, statements
) -> None:
    ada, bob = await factory.user(), await factory.user()
    await insert_orders(engine, ada.id, 3)
    await insert_orders(engine, bob.id, 1500)
    await drain(order_stub.StreamOrders(api.StreamOrdersRequest(user_id=ada.id)))  # warm up

    before = statements.count
    few = await drain(order_stub.StreamOrders(api.StreamOrdersRequest(user_id=ada.id)))
    few_count = statements.count - before
    before = statements.count
    many = await drain(
        order_stub.StreamOrders(api.StreamOrdersRequest(user_id=bob.id, batch_size=100))
    )
    many_count = statements.count - before

    assert sum(len(b.orders) for b in few) == 3
    assert sum(len(b.orders) for b in many) == 1500
    assert len(many) == 15
    # The streamed orders' statement and one items statement per batch (both now seen by
    # SQLAlchemy's hooks): the count follows the batches, never the orders.
    assert few_count == 1 + len(few) == 2
    assert many_count == 1 + len(many) == 16


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"batch_size": -1}, ["batch_size"]),
        ({"user_id": -1}, ["user_id"]),
        ({"status": 99}, ["status"]),
        ({"user_id": -1, "status": 42, "batch_size": -5}, ["user_id", "status", "batch_size"]),
    ],
)
async def test_stream_orders_rejects_bad_requests(
    order_stub, request_fields: dict[str, int], fields: list[str]
) -> None:
    failure = await stream_fails(order_stub.StreamOrders(api.StreamOrdersRequest(**request_fields)))
    assert_invalid(failure, *fields)
    assert set(failure.violations) == set(fields)


# --------------------------------------------------------------------------- UpdateOrderStatus


async def db_status(engine: AsyncEngine, order_id: int) -> str:
    return await scalar(engine, "SELECT status FROM orders WHERE id = :id", id=order_id)


@pytest.mark.parametrize(
    "path",
    [
        [PAID, SHIPPED, DELIVERED],
        [CANCELLED],
        [PAID, CANCELLED],
    ],
)
async def test_update_order_status_allowed_moves(
    order_stub, factory: Factory, engine: AsyncEngine, path: list[int]
) -> None:
    user = await factory.user()
    order = await factory.order(user, items=[("A", 2, "1.50")])
    for target in path:
        moved = await order_stub.UpdateOrderStatus(
            api.UpdateOrderStatusRequest(id=order.id, status=target)
        )
        assert moved.status == target
        assert moved.id == order.id
        assert moved.total == "3.00"
        assert list(moved.items) == [line("A", 2, "1.50")]
        assert await db_status(engine, order.id) == DB_STATUS[target].value


@pytest.mark.parametrize(("source", "target"), sorted(ALLOWED))
async def test_update_order_status_each_allowed_move_from_the_db_state(
    order_stub, factory: Factory, engine: AsyncEngine, source: int, target: int
) -> None:
    user = await factory.user()
    order = await factory.order(user, status=DB_STATUS[source])
    moved = await order_stub.UpdateOrderStatus(
        api.UpdateOrderStatusRequest(id=order.id, status=target)
    )
    assert moved.status == target
    assert await db_status(engine, order.id) == DB_STATUS[target].value


@pytest.mark.parametrize(("source", "target"), DISALLOWED)
async def test_update_order_status_disallowed_moves(
    order_stub, factory: Factory, engine: AsyncEngine, source: int, target: int
) -> None:
    user = await factory.user()
    order = await factory.order(user, status=DB_STATUS[source])
    updated_at = await scalar(engine, "SELECT updated_at FROM orders WHERE id = :id", id=order.id)

    failure = await rpc_fails(
        order_stub.UpdateOrderStatus(api.UpdateOrderStatusRequest(id=order.id, status=target))
    )

    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "INVALID_STATUS_TRANSITION"
    assert failure.domain == DOMAIN
    assert failure.metadata == {
        "from": DB_STATUS[source].name,
        "to": DB_STATUS[target].name,
    }
    assert await db_status(engine, order.id) == DB_STATUS[source].value
    assert (
        await scalar(engine, "SELECT updated_at FROM orders WHERE id = :id", id=order.id)
        == updated_at
    )


async def test_update_order_status_advances_updated_at(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    user = await factory.user()
    created = await order_stub.CreateOrder(create_request(user.id))

    moved = await order_stub.UpdateOrderStatus(
        api.UpdateOrderStatusRequest(id=created.id, status=PAID)
    )

    assert moved.updated_at.ToDatetime() > created.updated_at.ToDatetime()
    assert moved.created_at == created.created_at
    stored = await scalar(engine, "SELECT updated_at FROM orders WHERE id = :id", id=created.id)
    assert moved.updated_at.ToDatetime(tzinfo=stored.tzinfo) == stored
    fetched = await order_stub.GetOrder(api.GetOrderRequest(id=created.id))
    assert fetched.updated_at == moved.updated_at
    assert fetched.status == PAID


@pytest.mark.parametrize("status", [pb.ORDER_STATUS_UNSPECIFIED, 99, -1])
async def test_update_order_status_rejects_unspecified_or_unknown_status(
    order_stub, factory: Factory, engine: AsyncEngine, status: int
) -> None:
    user = await factory.user()
    order = await factory.order(user)
    failure = await rpc_fails(
        order_stub.UpdateOrderStatus(api.UpdateOrderStatusRequest(id=order.id, status=status))
    )
    assert_invalid(failure, "status")
    assert await db_status(engine, order.id) == "pending"


@pytest.mark.parametrize("order_id", [0, -1])
async def test_update_order_status_rejects_bad_id(order_stub, order_id: int) -> None:
    failure = await rpc_fails(
        order_stub.UpdateOrderStatus(api.UpdateOrderStatusRequest(id=order_id, status=PAID))
    )
    assert_invalid(failure, "id")


async def test_update_order_status_unknown_order_is_not_found(order_stub) -> None:
    failure = await rpc_fails(
        order_stub.UpdateOrderStatus(api.UpdateOrderStatusRequest(id=777777, status=PAID))
    )
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "ORDER_NOT_FOUND"
    assert failure.domain == DOMAIN


async def test_update_order_status_concurrent_conflicting_moves_apply_one(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    """PAID -> SHIPPED and PAID -> CANCELLED at once: the row lock lets exactly one win."""
    user = await factory.user()
    order = await factory.order(user, status=OrderStatus.PAID)
    results = await asyncio.gather(
        *(
            order_stub.UpdateOrderStatus(api.UpdateOrderStatusRequest(id=order.id, status=s))
            for s in (SHIPPED, CANCELLED) * 4
        ),
        return_exceptions=True,
    )
    won = {r.status for r in results if isinstance(r, pb.Order)}
    lost = [r for r in results if not isinstance(r, pb.Order)]
    assert len(won) == 1
    (winner,) = won
    loser = CANCELLED if winner == SHIPPED else SHIPPED
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in lost)
    assert all(r.code() == grpc.StatusCode.FAILED_PRECONDITION for r in lost)
    assert len(lost) >= 4  # every move to the losing status failed
    assert await db_status(engine, order.id) == DB_STATUS[winner].value
    assert loser not in won


async def test_update_order_status_to_the_current_status_is_a_no_op(
    order_stub, factory: Factory, engine: AsyncEngine
) -> None:
    """A repeated UpdateOrderStatus (e.g. a client retry) succeeds and changes nothing."""
    user = await factory.user()
    order = await factory.order(user, status=OrderStatus.PAID)
    updated_at = await scalar(engine, "SELECT updated_at FROM orders WHERE id = :id", id=order.id)
    again = await order_stub.UpdateOrderStatus(
        api.UpdateOrderStatusRequest(id=order.id, status=PAID)
    )
    assert again.status == PAID
    assert await db_status(engine, order.id) == "paid"
    assert await scalar(engine, "SELECT count(*) FROM audit_log WHERE table_name = 'orders'") == 1
    assert (
        await scalar(engine, "SELECT updated_at FROM orders WHERE id = :id", id=order.id)
        == updated_at
    )
