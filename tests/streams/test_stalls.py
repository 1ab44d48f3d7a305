"""Streams cannot starve unary calls: exports hold at most SHOP_MAX_STREAM_CONNECTIONS of the
pool, and a peer that takes (or sends) nothing for SHOP_STREAM_STALL_TIMEOUT ends its call with
ABORTED / STREAM_STALLED, its snapshot or transaction released. A real server process with a pool
of 5 and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import pytest
from shop.v1 import account_service_pb2 as accounts
from shop.v1 import account_service_pb2_grpc, user_service_pb2_grpc
from shop.v1 import user_service_pb2 as api
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import Factory
from tests.process import served_process
from tests.rpc import failure_of
from tests.streams.helpers import insert_users, session_states

USERS = 20_000
STREAMS = 50
STALL = 3.0
# No BDP probing: the window stays at its 64 KiB default, as a consumer's would once its
# buffers are full, so an export of 20k users stalls after a few batches.
READS_NOTHING = [("grpc.http2.bdp_probe", 0)]
SMALL_POOL = {
    "SHOP_POOL_SIZE": "5",
    "SHOP_MAX_OVERFLOW": "0",
    "SHOP_POOL_TIMEOUT": "30",
    "SHOP_STREAM_STALL_TIMEOUT": str(STALL),
}


async def exports_holding_snapshots(engine: AsyncEngine) -> int:
    """Once the count of snapshots held open (each export blocked on its reader's window) stops
    moving: every export the server admitted is then holding its connection."""
    last = -1
    for _ in range(50):
        held = (await session_states(engine)).get("idle in transaction", 0)
        if held and held == last:
            return held
        last = held
        await asyncio.sleep(0.2)
    raise AssertionError(f"the exports' snapshots never settled (last count {last})")


async def ended(call: grpc.aio.UnaryStreamCall) -> tuple[list[api.UserBatch], grpc.aio.AioRpcError]:
    """Everything the stream delivered, then the error that ended it (it must end in one)."""
    batches: list[api.UserBatch] = []
    try:
        async for batch in call:
            batches.append(batch)
    except grpc.aio.AioRpcError as error:
        return batches, error
    raise AssertionError(f"the stream ended OK after {len(batches)} batches")


async def test_fifty_stalled_exports_leave_unary_calls_a_connection_and_end_released(
    database_url: str, engine: AsyncEngine, factory: Factory, tmp_path: Path
) -> None:
    await insert_users(engine, USERS)
    source = await factory.account(balance="100.00")
    target = await factory.account()
    async with (
        served_process(database_url, tmp_path / "serve.log", **SMALL_POOL) as served,
        grpc.aio.insecure_channel(served.address, options=READS_NOTHING) as stalled_channel,
    ):
        exports = user_service_pb2_grpc.UserServiceStub(stalled_channel)
        calls = [
            exports.StreamUsers(api.StreamUsersRequest(batch_size=200)) for _ in range(STREAMS)
        ]
        await exports_holding_snapshots(engine)

        users = user_service_pb2_grpc.UserServiceStub(served.channel)
        money = account_service_pb2_grpc.AccountServiceStub(served.channel)
        user = await users.CreateUser(
            api.CreateUserRequest(email="u@example.com", first_name="A", last_name="B"), timeout=5
        )
        started = time.monotonic()
        assert (await users.GetUser(api.GetUserRequest(id=user.id), timeout=1)).id == user.id
        moved = await money.Transfer(
            accounts.TransferRequest(
                from_account_id=source.id,
                to_account_id=target.id,
                amount="1.00",
                request_id=uuid.uuid4().hex,
            ),
            timeout=1,
        )
        assert moved.amount == "1.00"
        assert time.monotonic() - started < 2  # both answered, each within its 1 s deadline

        await asyncio.sleep(STALL + 1)  # still reading nothing, past the stall timeout
        outcomes = await asyncio.wait_for(asyncio.gather(*(ended(c) for c in calls)), 30)

    stalled = [(b, e) for b, e in outcomes if e.code() == grpc.StatusCode.ABORTED]
    refused = [(b, e) for b, e in outcomes if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(stalled) + len(refused) == STREAMS
    # Half the pool of 5: two exports held a connection; every other was refused at once.
    assert len(stalled) == 2
    for batches, error in refused:
        assert batches == []
        assert failure_of(error).reason == "TOO_MANY_STREAMS"
    for batches, error in stalled:
        failure = failure_of(error)
        assert failure.reason == "STREAM_STALLED"
        assert "SHOP_STREAM_STALL_TIMEOUT" in failure.message
        # The token in the status is the last batch the reader got: resume from either.
        assert 0 < len(batches) < USERS // 200
        assert failure.metadata["resume_token"] == batches[-1].resume_token

    # Nothing left open: the stalled exports' snapshots were rolled back, connections returned.
    states = await session_states(engine)
    assert states.get("idle in transaction", 0) == 0
    assert states.get("active", 0) == 0


async def test_a_stalled_export_resumes_from_its_token_with_nothing_lost_or_repeated(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    await insert_users(engine, USERS)
    async with (
        served_process(database_url, tmp_path / "serve.log", **SMALL_POOL) as served,
        grpc.aio.insecure_channel(served.address, options=READS_NOTHING) as channel,
    ):
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        call = stub.StreamUsers(api.StreamUsersRequest(batch_size=200))
        await call.wait_for_connection()
        await asyncio.sleep(STALL + 1)  # read nothing past the stall timeout
        batches, error = await ended(call)
        failure = failure_of(error)
        assert failure.reason == "STREAM_STALLED"

        rest = stub.StreamUsers(
            api.StreamUsersRequest(batch_size=2000, resume_token=failure.metadata["resume_token"])
        )
        tail = [batch async for batch in rest]
    ids = [user.id for batch in [*batches, *tail] for user in batch.users]
    assert len(ids) == USERS
    assert ids == sorted(set(ids))


async def test_an_import_whose_client_sends_nothing_ends_aborted_and_rolls_back(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    async with served_process(database_url, tmp_path / "serve.log", **SMALL_POOL) as served:
        stub = user_service_pb2_grpc.UserServiceStub(served.channel)
        call = stub.ImportUsers()
        rows = [
            api.UpsertUser(email=f"imp{n}@example.com", first_name="I", last_name="U")
            for n in range(100)
        ]
        await call.write(api.ImportUsersRequest(users=rows))
        # ... then nothing: no more messages and no end of stream, past the stall timeout.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call, STALL + 15)
        failure = failure_of(caught.value)
        assert failure.code == grpc.StatusCode.ABORTED
        assert failure.reason == "STREAM_STALLED"
        got = await user_service_pb2_grpc.UserServiceStub(served.channel).ListUsers(
            api.ListUsersRequest(page_size=10), timeout=5
        )
        assert list(got.users) == []  # the staged batch was rolled back with its transaction
    states = await session_states(engine)
    assert states.get("idle in transaction", 0) == 0
