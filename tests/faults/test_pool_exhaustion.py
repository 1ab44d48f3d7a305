"""Pool exhaustion: with one pooled connection held by a call that waits on a row lock, other
callers get UNAVAILABLE / DATABASE_UNAVAILABLE with a RetryInfo hint after at most about
pool_timeout, and Health Check keeps answering SERVING: the database answers, only the pool is
busy (the probe has its own connection), so a load balancer must not take the server out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import account_service_pb2_grpc, user_service_pb2, user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import Factory
from tests.faults.retry_info import DATABASE_UNAVAILABLE, retry_hint
from tests.servers import OwnServer, own_server

POOL_TIMEOUT = 0.5
# "Within about pool_timeout": the pool's wait plus scheduling slack on a shared 2-core machine.
ANSWER_BOUND = POOL_TIMEOUT + 1.5
DEADLINE = 10.0
HEALTH_INTERVAL = 0.2


@pytest_asyncio.fixture
async def tiny(database_url: str) -> AsyncIterator[OwnServer]:
    # Probes every 0.2 s, so several run while the pool is exhausted and each must find the
    # database answering.
    busy = own_server(
        database_url, pool_size=1, pool_timeout=POOL_TIMEOUT, health_interval=HEALTH_INTERVAL
    )
    async with busy as server:
        yield server


async def wait_for_serving(health: health_pb2_grpc.HealthStub) -> None:
    """Health is NOT_SERVING until the probe's first answer; wait for that answer."""
    bound = time.monotonic() + 10
    while (
        await health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
    ).status != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < bound, "health never became SERVING"
        await asyncio.sleep(0.05)


async def test_exhausted_pool_answers_unavailable_with_retry_hint_and_health_stays_up(
    tiny: OwnServer,
    engine: AsyncEngine,
    factory: Factory,
) -> None:
    account = await factory.account(balance="10.00")
    user = await factory.user()
    accounts = account_service_pb2_grpc.AccountServiceStub(tiny.channel)
    users = user_service_pb2_grpc.UserServiceStub(tiny.channel)
    health = health_pb2_grpc.HealthStub(tiny.channel)
    await wait_for_serving(health)

    async with engine.connect() as holder:
        # The test holds the account's row lock; the server's only connection then waits on it.
        await holder.execute(
            text("SELECT 1 FROM accounts WHERE id = :id FOR UPDATE"), {"id": account.id}
        )
        blocked = asyncio.ensure_future(
            accounts.Deposit(
                accounts_api.DepositRequest(
                    account_id=account.id, amount="1.00", request_id="exhaust-1"
                ),
                timeout=DEADLINE,
            )
        )
        bound = time.monotonic() + 5
        while tiny.running.engine.pool.checkedout() < 1:  # type: ignore[attr-defined]
            assert time.monotonic() < bound, "the deposit never took the pooled connection"
            await asyncio.sleep(0.02)

        for attempt in range(3):
            started = time.monotonic()
            try:
                await users.GetUser(user_service_pb2.GetUserRequest(id=user.id), timeout=DEADLINE)
            except grpc.aio.AioRpcError as error:
                elapsed = time.monotonic() - started
                # The pool's timeout, not the concurrency limit (1000 calls): UNAVAILABLE.
                assert retry_hint(error) == DATABASE_UNAVAILABLE, (attempt, error)
                assert elapsed < ANSWER_BOUND, elapsed
            else:
                raise AssertionError("GetUser succeeded while the only connection was held")

            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, attempt
        assert not blocked.done()
        await holder.rollback()  # releases the row lock

    # The blocked call completes, and the pool serves the next callers again.
    deposited = await asyncio.wait_for(blocked, DEADLINE)
    assert deposited.balance == "11.00"
    again = await users.GetUser(user_service_pb2.GetUserRequest(id=user.id), timeout=DEADLINE)
    assert again.id == user.id
