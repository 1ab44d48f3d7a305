"""The server answers over a real channel: health, reflection and one RPC of each service."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import user_service_pb2 as users_api

from tests.rpc import rpc_fails


async def test_health_serves_every_service(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "shop.v1.UserService", "shop.v1.OrderService", "shop.v1.AccountService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_create_then_get_user(user_stub) -> None:
    created = await user_stub.CreateUser(
        users_api.CreateUserRequest(email="Ada@Example.com", first_name="Ada", last_name="Lovelace")
    )
    assert created.id > 0
    assert created.email == "ada@example.com"
    assert created.full_name == "Ada Lovelace"
    fetched = await user_stub.GetUser(users_api.GetUserRequest(id=created.id))
    assert fetched == created


async def test_unknown_user_is_not_found(user_stub) -> None:
    failure = await rpc_fails(user_stub.GetUser(users_api.GetUserRequest(id=424242)))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.reason == "USER_NOT_FOUND"
    assert failure.domain == "shop.v1"
