"""Bearer tokens and roles, through servers of the tests' own with SHOP_AUTH_TOKENS set."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shop.v1 import user_service_pb2 as api

from service.serving.security import InsecureBindError
from tests.rpc import failure_of
from tests.servers import OwnServer, own_server

READ, WRITE = "r3ad-t0ken-abc", "wr1te-t0ken-xyz"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest_asyncio.fixture
async def guarded(database_url: str) -> AsyncIterator[OwnServer]:
    async with own_server(database_url, auth_tokens=f"{READ}:read,{WRITE}:write") as server:
        yield server


async def test_missing_or_unknown_token_is_unauthenticated(guarded: OwnServer) -> None:
    for metadata in ([], bearer("nope"), [("authorization", READ)]):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await guarded.users.GetUser(api.GetUserRequest(id=1), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert failure_of(caught.value).reason == "UNAUTHENTICATED"
        assert any(k == "x-request-id" for k, _ in caught.value.trailing_metadata())


async def test_read_token_reads_but_may_not_write(guarded: OwnServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # past auth: the servicer answers
        await guarded.users.GetUser(api.GetUserRequest(id=999), metadata=bearer(READ))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    stream = guarded.users.StreamUsers(api.StreamUsersRequest(), metadata=bearer(READ))
    assert [batch async for batch in stream] == []

    create = api.CreateUserRequest(email="r@example.com", first_name="R", last_name="O")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.users.CreateUser(create, metadata=bearer(READ))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert failure_of(caught.value).reason == "PERMISSION_DENIED"

    async def no_rows() -> AsyncIterator[api.ImportUsersRequest]:
        return
        yield

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # a client-streaming write RPC
        await guarded.users.ImportUsers(no_rows(), metadata=bearer(READ))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_write_token_writes_and_tokens_stay_out_of_logs(
    guarded: OwnServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    create = api.CreateUserRequest(email="w@example.com", first_name="W", last_name="R")
    user = await guarded.users.CreateUser(create, metadata=bearer(WRITE))
    assert user.id > 0
    read = await guarded.users.GetUser(api.GetUserRequest(id=user.id), metadata=bearer(WRITE))
    assert read.email == "w@example.com"
    with pytest.raises(grpc.aio.AioRpcError):
        await guarded.users.GetUser(api.GetUserRequest(id=1), metadata=bearer(READ + "x"))
    assert "service.access" in {r.name for r in caplog.records}
    assert READ not in caplog.text and WRITE not in caplog.text


async def test_health_and_reflection_need_no_token(guarded: OwnServer) -> None:
    health = health_pb2_grpc.HealthStub(guarded.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="shop.v1.UserService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = [a async for a in reflection.ServerReflectionInfo(iter([ask]))]
    names = {s.name for s in answers[0].list_services_response.service}
    assert "shop.v1.UserService" in names


async def test_no_tokens_refuses_a_non_loopback_address(database_url: str) -> None:
    with pytest.raises(InsecureBindError, match="SHOP_ALLOW_INSECURE"):
        async with own_server(database_url, grpc_host="0.0.0.0"):
            pass
    # Beyond loopback the development page-token secret is refused too (test_settings.py).
    own = {"grpc_host": "0.0.0.0", "page_token_secret": "test-auth-page-secret"}
    async with own_server(database_url, **own, allow_insecure=True) as server:
        assert server.running.port > 0
    async with own_server(database_url, **own, auth_tokens=f"{READ}:read") as server:
        assert server.running.port > 0
