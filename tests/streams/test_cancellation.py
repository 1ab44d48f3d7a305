"""Cancelled calls end their cursor and transaction at once and give the connection back clean."""

from __future__ import annotations

import asyncio
import contextlib
import random

import grpc
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from service.serving.server import RunningServer
from tests.streams.helpers import eventually, insert_users, session_states

Stub = user_service_pb2_grpc.UserServiceStub
STREAMS = 120
UNARY = 80
IN_FLIGHT = 8  # the shared PostgreSQL has few connections to spare


async def cancel_stream_after(stub: Stub, batches: int) -> None:
    call = stub.StreamUsers(api.StreamUsersRequest(batch_size=50))
    for _ in range(batches):
        if not isinstance(await call.read(), api.UserBatch):
            break
    call.cancel()


async def cancel_unary_after(stub: Stub, seconds: float) -> None:
    call = stub.ListUsers(api.ListUsersRequest(page_size=1000, full_name="user"))
    await asyncio.sleep(seconds)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):  # what a cancelled call raises
        await call


async def no_leftovers(server: RunningServer, engine: AsyncEngine) -> bool:
    states = await session_states(engine)
    return server.engine.pool.checkedout() == 0 and not any(
        state.startswith("idle in transaction") for state in states
    )


async def test_streams_cancelled_at_random_points_leave_no_transaction_behind(
    server: RunningServer,
    user_stub: Stub,
    engine: AsyncEngine,
    invalidations: list[BaseException | None],
) -> None:
    await insert_users(engine, 2_000)  # 40 batches of 50: most streams are cut off mid-way
    rng = random.Random(4)
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(batches: int) -> None:
        async with gate:
            await cancel_stream_after(user_stub, batches)

    await asyncio.gather(*(one(rng.randint(0, 30)) for _ in range(STREAMS)))

    assert await eventually(lambda: no_leftovers(server, engine)), await session_states(engine)
    # Each cursor was closed and its transaction rolled back on a connection the pool kept.
    assert invalidations == []
    users = [u async for b in user_stub.StreamUsers(api.StreamUsersRequest()) for u in b.users]
    assert len(users) == 2_000


async def test_unary_calls_cancelled_mid_flight_leave_no_transaction_behind(
    server: RunningServer, user_stub: Stub, engine: AsyncEngine
) -> None:
    await insert_users(engine, 2_000)
    rng = random.Random(5)
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(seconds: float) -> None:
        async with gate:
            await cancel_unary_after(user_stub, seconds)

    await asyncio.gather(*(one(rng.uniform(0, 0.02)) for _ in range(UNARY)))

    assert await eventually(lambda: no_leftovers(server, engine)), await session_states(engine)
    page = await user_stub.ListUsers(api.ListUsersRequest(page_size=10))
    assert len(page.users) == 10


async def test_a_client_that_goes_away_ends_its_stream(
    server: RunningServer, engine: AsyncEngine
) -> None:
    await insert_users(engine, 3_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = Stub(channel).StreamUsers(api.StreamUsersRequest(batch_size=10))
        assert isinstance(await call.read(), api.UserBatch)
        assert server.engine.pool.checkedout() == 1  # the export holds its connection
    # The channel closed with the stream half read: no cancel() from the client.
    assert await eventually(lambda: no_leftovers(server, engine)), await session_states(engine)
