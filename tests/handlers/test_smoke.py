"""The server answers over a real channel: health, reflection, and a write then a read on each
of the three services (one user's order and account, read back as written)."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as users_api

from service.serving.server import SHOP_SERVICES
from tests.rpc import rpc_fails


async def test_health_serves_every_service(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SHOP_SERVICES):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_every_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(iter([request])):
        names |= {s.name for s in reply.list_services_response.service}
    assert {*SHOP_SERVICES, "grpc.health.v1.Health"} <= names


async def test_each_service_writes_then_reads(
    user_stub: Any, order_stub: Any, account_stub: Any
) -> None:
    user = await user_stub.CreateUser(
        users_api.CreateUserRequest(email="Ada@Example.com", first_name="Ada", last_name="Lovelace")
    )
    assert user.id > 0
    assert user.email == "ada@example.com"
    assert user.full_name == "Ada Lovelace"
    assert await user_stub.GetUser(users_api.GetUserRequest(id=user.id)) == user

    order = await order_stub.CreateOrder(
        orders_api.CreateOrderRequest(
            user_id=user.id,
            items=[pb.OrderItem(sku="BOOK", quantity=2, unit_price="19.99")],
            request_id="smoke-order",
        )
    )
    assert order.user_id == user.id
    assert order.total == "39.98"
    fetched = await order_stub.GetOrder(orders_api.GetOrderRequest(id=order.id))
    assert (fetched.id, fetched.total, list(fetched.items)) == (
        order.id,
        order.total,
        list(order.items),
    )

    account = await account_stub.OpenAccount(
        accounts_api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id="smoke-open")
    )
    deposited = await account_stub.Deposit(
        accounts_api.DepositRequest(account_id=account.id, amount="7.50", request_id="smoke-dep")
    )
    assert deposited.balance == "7.50"
    assert await account_stub.GetAccount(accounts_api.GetAccountRequest(id=account.id)) == deposited


async def test_unknown_user_is_not_found(user_stub: Any) -> None:
    failure = await rpc_fails(user_stub.GetUser(users_api.GetUserRequest(id=424242)))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "USER_NOT_FOUND"
    assert failure.domain == "shop.v1"
