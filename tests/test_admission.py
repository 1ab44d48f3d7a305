"""Admission's two budgets, through servers of the tests' own with tokens set: strangers holding
health Watch and reflection streams spend only the public budget (SHOP_MAX_PUBLIC_RPCS), never
the one token holders' calls count against (SHOP_MAX_CONCURRENT_RPCS); past a budget the answer
is RESOURCE_EXHAUSTED at once; and every way a call can end gives its slot back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from service.serving.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME
from tests.faults.retry_info import retry_hint
from tests.servers import OwnServer, free_port, own_server, rpc, scrape, wait_for_sample
from tests.streams.helpers import insert_users
from tests.tcp_proxy import tcp_proxy

READ, WRITE = "adm1ss1on-read", "adm1ss1on-write"
TOKENS = f"{READ}:read,{WRITE}:write"
CALL_TIMEOUT = 15.0  # bounds each wait, so a hang fails the test instead of stalling the run
SERVED_WITHIN = 1.0  # the issue's bound for a token holder's call among strangers' streams
MISSING = 999_999_999  # no user has this id

WATCH = "grpc.health.v1.Health/Watch"
IMPORT = "shop.v1.UserService/ImportUsers"
STREAM_USERS = "shop.v1.UserService/StreamUsers"
GET_USER = "shop.v1.UserService/GetUser"
REFLECTIONS = (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
PUBLIC_METHODS = (WATCH, *(f"{service}/ServerReflectionInfo" for service in REFLECTIONS))

TOO_MANY_CALLS = (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_CALLS", True)
TOO_MANY_PUBLIC_CALLS = (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_PUBLIC_CALLS", True)

Call = Any  # a grpc.aio call object, streaming one way or both


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def guarded(
    database_url: str, **settings: Any
) -> contextlib.AbstractAsyncContextManager[OwnServer]:
    """A server with tokens and metrics (the in-flight gauge says which calls it holds). The
    pool leaves room for the held ImportUsers calls under the stream-connection budget."""
    return own_server(
        database_url, auth_tokens=TOKENS, metrics_port=free_port(), pool_size=8, **settings
    )


async def watch(channel: grpc.aio.Channel) -> Call:
    """A health Watch stream with its first answer read: admitted, and held until cancelled."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    reply = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return call


def reflection(channel: grpc.aio.Channel, service: str) -> Call:
    """A ServerReflectionInfo stream (v1 and v1alpha are wire-identical) that sends nothing."""
    return channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )()


async def reflect(channel: grpc.aio.Channel, service: str) -> Call:
    """A reflection stream with one answer read: admitted, and held until cancelled."""
    call = reflection(channel, service)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
    assert reply.list_services_response.service
    return call


async def refused(opening: Awaitable[Any]) -> tuple[grpc.StatusCode, str | None, bool]:
    """What a call that must be refused said: (code, reason, whether RetryInfo came)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(opening, CALL_TIMEOUT)
    return retry_hint(caught.value)


def in_flight(method: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return ("grpc_server_in_flight", rpc(method))


async def none_in_flight(server: OwnServer, *methods: str) -> None:
    """Wait until the server holds none of these calls. The gauge drops after admission's
    `finally` (observability sits outside it), so from then on their slots are free."""
    for _ in range(400):  # 20 s: tells a leak from a moment on a loaded machine
        samples = await scrape(server)
        if not any(samples.get(in_flight(method), 0) for method in methods):
            return  # a method never called has no sample yet: none in flight
        await asyncio.sleep(0.05)
    raise AssertionError(f"still in flight: {methods}")


def import_users(server: OwnServer, channel: grpc.aio.Channel | None = None) -> Call:
    """An ImportUsers call that sends nothing: a shop.v1 call held open as long as we like."""
    stub = user_service_pb2_grpc.UserServiceStub(channel or server.channel)
    return stub.ImportUsers(metadata=bearer(WRITE))


def get_user(server: OwnServer, user_id: int, within: float = CALL_TIMEOUT) -> Awaitable[Any]:
    """A token holder's GetUser, with `within` as its deadline."""
    return server.users.GetUser(
        api.GetUserRequest(id=user_id), metadata=bearer(READ), timeout=within
    )


async def public_budget_is_whole(server: OwnServer, limit: int) -> None:
    """Exactly `limit` public streams are admitted, and the next one is refused: the count
    came back to zero, neither more (a leak) nor less (a double release)."""
    held = [await watch(server.channel) for _ in range(limit)]
    assert await refused(watch(server.channel)) == TOO_MANY_PUBLIC_CALLS
    for call in held:
        call.cancel()
    await none_in_flight(server, WATCH)


async def shop_budget_is_whole(server: OwnServer, limit: int) -> None:
    """Exactly `limit` shop calls are admitted (each held one ends OK), and one more is
    refused while they are held."""
    held = [import_users(server) for _ in range(limit)]
    assert await wait_for_sample(server, in_flight(IMPORT), limit)
    assert await refused(get_user(server, MISSING)) == TOO_MANY_CALLS
    for call in held:
        await call.done_writing()
    assert [(await call).imported for call in held] == [0] * limit  # none was refused


@contextlib.asynccontextmanager
async def channels(target: str, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(grpc.aio.insecure_channel(target)) for _ in range(count)
        ]


async def test_strangers_holding_every_public_slot_leave_a_token_holder_served(
    database_url: str,
) -> None:
    """The issue's case: 40 token-less Watch and reflection streams held, on connections of
    their own; a token holder's GetUser is served within 1 s all the same."""
    async with (
        guarded(database_url, max_concurrent_rpcs=20, max_public_rpcs=40) as server,
        channels(f"127.0.0.1:{server.running.port}", 4) as strangers,
    ):
        user = await server.users.CreateUser(
            api.CreateUserRequest(email="held@example.com", first_name="H", last_name="Eld"),
            metadata=bearer(WRITE),
            timeout=CALL_TIMEOUT,
        )
        watches = [await watch(strangers[n % 4]) for n in range(20)]
        # Idle reflection streams: opened, nothing sent; the gauge says the server holds them.
        idle = [reflection(strangers[n % 4], REFLECTIONS[n % 2]) for n in range(20)]
        for method in PUBLIC_METHODS[1:]:
            assert await wait_for_sample(server, in_flight(method), 10), method
        assert await refused(watch(strangers[0])) == TOO_MANY_PUBLIC_CALLS  # all 40 taken

        assert (await get_user(server, user.id, within=SERVED_WITHIN)).email == user.email
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # a served answer too
            await get_user(server, MISSING, within=SERVED_WITHIN)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        for call in (*watches, *idle):
            call.cancel()


async def test_the_public_budget_refuses_one_more_public_stream_and_shop_calls_still_work(
    database_url: str,
) -> None:
    async with guarded(database_url, max_concurrent_rpcs=20, max_public_rpcs=4) as server:
        channel = server.channel
        held = [
            await watch(channel),
            await watch(channel),
            await reflect(channel, V1ALPHA_SERVICE_NAME),
            await reflect(channel, V1_SERVICE_NAME),
        ]
        assert await refused(watch(channel)) == TOO_MANY_PUBLIC_CALLS
        for service in REFLECTIONS:
            assert await refused(reflect(channel, service)) == TOO_MANY_PUBLIC_CALLS

        # Health Check is not counted: a balancer's probe is answered with the budget spent.
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # the shop budget is untouched
            await get_user(server, MISSING)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        held[0].cancel()  # one slot back: one more public stream is admitted, and only one
        assert await wait_for_sample(server, in_flight(WATCH), 1)
        held[0] = await watch(channel)
        assert await refused(watch(channel)) == TOO_MANY_PUBLIC_CALLS
        for call in held:
            call.cancel()


async def test_a_call_without_a_token_is_refused_by_auth_before_it_takes_a_slot(
    database_url: str,
) -> None:
    async with guarded(database_url, max_concurrent_rpcs=1) as server:
        held = import_users(server)
        assert await wait_for_sample(server, in_flight(IMPORT), 1)
        # The budget is spent: a stranger hears UNAUTHENTICATED, a token holder the budget.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.users.GetUser(api.GetUserRequest(id=999), timeout=CALL_TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await refused(get_user(server, MISSING)) == TOO_MANY_CALLS

        # Token-less calls held open (a client stream sending nothing) take no slot either.
        strangers = [server.users.ImportUsers() for _ in range(5)]
        for call in strangers:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(call, CALL_TIMEOUT)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await held.done_writing()
        assert (await held).imported == 0
        await shop_budget_is_whole(server, 1)


async def test_cancelled_public_streams_give_their_slots_back(database_url: str) -> None:
    """Round after round: the budget filled, one more refused, every stream cancelled (by the
    client, or by closing its channel); the budget is whole again each time."""
    async with guarded(database_url, max_public_rpcs=4) as server:
        target = f"127.0.0.1:{server.running.port}"
        for _ in range(3):
            async with channels(target, 1) as [channel]:
                held = [
                    await watch(channel),
                    await watch(channel),
                    await reflect(channel, V1ALPHA_SERVICE_NAME),
                    reflection(channel, V1_SERVICE_NAME),  # idle: nothing sent
                ]
                assert await wait_for_sample(server, in_flight(PUBLIC_METHODS[2]), 1)
                assert await refused(watch(server.channel)) == TOO_MANY_PUBLIC_CALLS
                held[0].cancel()
                held[2].cancel()
            # The channel closed with the rest still open: no cancel() from the client.
            await none_in_flight(server, *PUBLIC_METHODS)
            await public_budget_is_whole(server, 4)


async def test_aborted_cancelled_and_refused_shop_calls_give_their_slots_back(
    database_url: str, engine: AsyncEngine
) -> None:
    # An export longer than what flow control lets through to a reader that takes nothing
    # (tests/streams/test_backpressure.py: at most a quarter of 40 000 users, BDP off).
    await insert_users(engine, 20_000)
    async with guarded(database_url, max_concurrent_rpcs=3) as server:
        for _ in range(3):  # aborted unary calls (NOT_FOUND, INVALID_ARGUMENT)
            with pytest.raises(grpc.aio.AioRpcError):
                await get_user(server, MISSING)
            with pytest.raises(grpc.aio.AioRpcError):
                await server.users.UpdateUser(
                    api.UpdateUserRequest(), metadata=bearer(WRITE), timeout=CALL_TIMEOUT
                )
        # An aborted stream: a resume token that does not parse.
        bad = api.StreamUsersRequest(resume_token="not-a-token")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in server.users.StreamUsers(bad, metadata=bearer(READ)):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # Exports cancelled mid-way, held at a message the reader does not take.
        slow = grpc.aio.insecure_channel(
            f"127.0.0.1:{server.running.port}", options=[("grpc.http2.bdp_probe", 0)]
        )
        exports = [
            user_service_pb2_grpc.UserServiceStub(slow).StreamUsers(
                api.StreamUsersRequest(batch_size=50), metadata=bearer(READ)
            )
            for _ in range(2)
        ]
        for export in exports:
            assert len((await asyncio.wait_for(export.read(), CALL_TIMEOUT)).users) == 50
        held = import_users(server)
        assert await wait_for_sample(server, in_flight(IMPORT), 1)
        assert await wait_for_sample(server, in_flight(STREAM_USERS), 2)
        for _ in range(3):  # refused calls give back nothing they did not take
            assert await refused(get_user(server, MISSING)) == TOO_MANY_CALLS
        for call in (*exports, held):
            call.cancel()
        await slow.close()

        await none_in_flight(server, IMPORT, STREAM_USERS, GET_USER)
        await shop_budget_is_whole(server, 3)


async def close_connections(proxy: Any) -> None:
    await proxy.close()  # the client's connection ends without a word of HTTP/2


async def go_silent(proxy: Any) -> None:
    proxy.go_silent()  # the client's host vanished: keepalive finds out


@pytest.mark.parametrize("vanish", [close_connections, go_silent], ids=["closed", "silent"])
async def test_calls_of_a_client_that_vanished_give_their_slots_back(
    database_url: str, vanish: Callable[[Any], Awaitable[None]]
) -> None:
    async with (
        guarded(
            database_url,
            max_concurrent_rpcs=2,
            max_public_rpcs=2,
            keepalive_time_ms=1000,
            keepalive_timeout_ms=1000,
        ) as server,
        tcp_proxy(server.running.port) as proxy,
        grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel,
    ):
        public = [await watch(channel), await reflect(channel, V1_SERVICE_NAME)]
        shop = [import_users(server, channel) for _ in range(2)]
        assert await wait_for_sample(server, in_flight(IMPORT), 2)
        assert await refused(watch(server.channel)) == TOO_MANY_PUBLIC_CALLS
        assert await refused(get_user(server, MISSING)) == TOO_MANY_CALLS

        await vanish(proxy)
        await none_in_flight(server, IMPORT, *PUBLIC_METHODS)
        await public_budget_is_whole(server, 2)
        await shop_budget_is_whole(server, 2)
        for call in (*public, *shop):
            call.cancel()
