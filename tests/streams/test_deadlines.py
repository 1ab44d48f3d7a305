"""The caller's deadline bounds the database work: a blocked query is cancelled server-side."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import account_service_pb2_grpc, user_service_pb2_grpc
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.serving.server import RunningServer
from tests.factories import Factory
from tests.rpc import rpc_fails
from tests.streams.helpers import eventually, insert_users, lock_waiters, session_states

Stub = user_service_pb2_grpc.UserServiceStub


def rename(user_id: int, first_name: str) -> api.UpdateUserRequest:
    return api.UpdateUserRequest(
        user=pb.User(id=user_id, first_name=first_name),
        update_mask=field_mask_pb2.FieldMask(paths=["first_name"]),
    )


async def test_a_call_blocked_on_a_row_lock_ends_at_its_deadline_and_stops_waiting(
    server: RunningServer,
    user_stub: Stub,
    engine: AsyncEngine,
    factory: Factory,
    invalidations: list[BaseException | None],
) -> None:
    user = await factory.user()
    async with engine.connect() as holder:
        await holder.begin()
        await holder.execute(text("SELECT 1 FROM users WHERE id = :id FOR UPDATE"), {"id": user.id})

        failure = await rpc_fails(user_stub.UpdateUser(rename(user.id, "Blocked"), timeout=1.0))
        assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED

        # The lock is still held: only a server-side cancel can have ended the server's wait.
        assert await eventually(lambda: _no_lock_waiters(engine))
        assert await eventually(lambda: _pool_idle(server)), server.engine.pool.status()
        states = await session_states(engine)
        assert "idle in transaction (aborted)" not in states
        # statement_timeout (set from the deadline) ended the wait before grpc cancelled the
        # call: the transaction rolled back normally and the pool kept the connection.
        assert invalidations == []
        await holder.rollback()

    # The pool is healthy: the same row can be written now.
    renamed = await user_stub.UpdateUser(rename(user.id, "Unblocked"), timeout=5.0)
    assert renamed.first_name == "Unblocked"


async def test_a_transfer_blocked_on_a_row_lock_ends_at_its_deadline_and_applies_nothing(
    server: RunningServer,
    account_stub: account_service_pb2_grpc.AccountServiceStub,
    engine: AsyncEngine,
    factory: Factory,
    invalidations: list[BaseException | None],
) -> None:
    """The same for Transfer, whose batch (app/money_writer.py) takes its lone caller's deadline
    as its statement_timeout."""
    source = await factory.account(balance="10.00")
    target = await factory.account(balance="0.00")
    request = accounts_api.TransferRequest(
        from_account_id=source.id, to_account_id=target.id, amount="1.00", request_id="dl-1"
    )
    async with engine.connect() as holder:
        await holder.begin()
        await holder.execute(
            text("SELECT 1 FROM accounts WHERE id = :id FOR UPDATE"), {"id": target.id}
        )
        failure = await rpc_fails(account_stub.Transfer(request, timeout=1.0))
        assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await eventually(lambda: _no_lock_waiters(engine))
        assert await eventually(lambda: _pool_idle(server)), server.engine.pool.status()
        assert "idle in transaction (aborted)" not in await session_states(engine)
        assert invalidations == []  # statement_timeout ended it; the connection was kept
        await holder.rollback()

    # Nothing was applied, the key included: the same request now goes through, once.
    done = await account_stub.Transfer(request, timeout=5.0)
    assert await account_stub.Transfer(request, timeout=5.0) == done
    account = await account_stub.GetAccount(accounts_api.GetAccountRequest(id=source.id))
    assert account.balance == "9.00"


async def test_a_deadline_ends_an_export_and_frees_its_connection(
    server: RunningServer, user_stub: Stub, engine: AsyncEngine
) -> None:
    await insert_users(engine, 2_000)
    # Long enough that the first batch surely comes first, even on a loaded machine (it takes
    # milliseconds): this tests what the deadline does, not how fast the first batch is.
    call = user_stub.StreamUsers(api.StreamUsersRequest(batch_size=10), timeout=3.0)
    assert isinstance(await call.read(), api.UserBatch)  # then the client stops reading
    assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await eventually(lambda: _pool_idle(server)), server.engine.pool.status()


async def test_calls_with_time_left_are_not_affected(user_stub: Stub, factory: Factory) -> None:
    user = await factory.user()
    renamed = await user_stub.UpdateUser(rename(user.id, "Quick"), timeout=10.0)
    assert renamed.first_name == "Quick"
    users = [
        u
        async for b in user_stub.StreamUsers(api.StreamUsersRequest(), timeout=10.0)
        for u in b.users
    ]
    assert [u.id for u in users] == [user.id]


async def _no_lock_waiters(engine: AsyncEngine) -> bool:
    return await lock_waiters(engine) == 0


async def _pool_idle(server: RunningServer) -> bool:
    return server.engine.pool.checkedout() == 0
