"""A database outage under traffic: our own PostgreSQL is stopped (immediate, as in a crash)
and started again while clients call. During the outage every call answers UNAVAILABLE, never
INTERNAL and never a hang; within 5 s of the database returning calls succeed again without a
server restart; and no transfer is lost or applied twice."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from decimal import Decimal
from typing import Any

import grpc
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import account_service_pb2 as api
from shop.v1 import account_service_pb2_grpc, user_service_pb2, user_service_pb2_grpc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Transfer
from tests.faults.own_postgres import OwnPostgres
from tests.faults.retry_info import DATABASE_UNAVAILABLE, retry_hint
from tests.faults.traffic import Call, assert_balances_match_transfers, record, record_stream
from tests.servers import OwnServer, own_server

DEADLINE = 5.0  # every client call; a call that hangs ends DEADLINE_EXCEEDED and fails the test
RECOVERY = 5.0  # the stated guarantee: calls succeed within 5 s of the database returning
OUTAGE = 2.0
START_BALANCE = Decimal("1000.00")


@pytest_asyncio.fixture
async def served(own_pg_url: str) -> AsyncIterator[OwnServer]:
    # The whole pool may go to streams: this test asks that every call during the outage answers
    # UNAVAILABLE, and with half the pool (3) its stream clients were sometimes refused first
    # (RESOURCE_EXHAUSTED / TOO_MANY_STREAMS; tests/streams/test_stalls.py tests that budget).
    limits = {"pool_size": 4, "max_overflow": 2, "pool_timeout": 2.0, "max_stream_connections": 6}
    async with own_server(own_pg_url, **limits) as server:
        yield server


async def open_accounts(channel: grpc.aio.Channel, count: int) -> list[int]:
    users = user_service_pb2_grpc.UserServiceStub(channel)
    accounts = account_service_pb2_grpc.AccountServiceStub(channel)
    user = await users.CreateUser(
        user_service_pb2.CreateUserRequest(
            email=f"{uuid.uuid4().hex[:8]}@example.com", first_name="Out", last_name="Age"
        ),
        timeout=DEADLINE,
    )
    ids = []
    for n in range(count):
        account = await accounts.OpenAccount(
            api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=f"open-{n}"),
            timeout=DEADLINE,
        )
        await accounts.Deposit(
            api.DepositRequest(
                account_id=account.id, amount=str(START_BALANCE), request_id=f"seed-{n}"
            ),
            timeout=DEADLINE,
        )
        ids.append(account.id)
    return ids


Hint = tuple[grpc.StatusCode, str | None, bool]


async def noting(call: Awaitable[Any], errors: list[grpc.aio.AioRpcError]) -> Any:
    """The unary call's reply; its error, if any, is kept for its status details."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        errors.append(error)
        raise


async def noting_stream(call: Any, errors: list[grpc.aio.AioRpcError]) -> Any:
    """The stream's messages; its error, if any, is kept for its status details."""
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError as error:
        errors.append(error)
        raise


class Traffic:
    """Client tasks calling reads, streams and transfers until stopped; every call recorded,
    and for each failed call what its status said (code, reason, RetryInfo)."""

    def __init__(self, channel: grpc.aio.Channel, account_ids: list[int]) -> None:
        self.stub = account_service_pb2_grpc.AccountServiceStub(channel)
        self.ids = account_ids
        self.calls: list[Call] = []
        self.hints: dict[int, Hint] = {}  # id(call) of each failed call
        self.stopped = asyncio.Event()
        self.sequence = itertools.count()

    def hint(self, call: Call) -> Hint | None:
        return self.hints.get(id(call))

    async def one_call(self, rng: random.Random) -> Call:
        errors: list[grpc.aio.AioRpcError] = []
        call = await self.some_call(rng, errors)
        if errors:
            self.hints[id(call)] = retry_hint(errors[0])
        return call

    async def some_call(self, rng: random.Random, errors: list[grpc.aio.AioRpcError]) -> Call:
        account = rng.choice(self.ids)
        kind = rng.choice(
            ["GetAccount", "ListTransfers", "StreamTransfers", "Transfer", "Transfer"]
        )
        if kind == "GetAccount":
            get = self.stub.GetAccount(api.GetAccountRequest(id=account), timeout=DEADLINE)
            return await record(kind, noting(get, errors))
        if kind == "ListTransfers":
            request = api.ListTransfersRequest(account_id=account, page_size=20)
            page = self.stub.ListTransfers(request, timeout=DEADLINE)
            return await record(kind, noting(page, errors))
        if kind == "StreamTransfers":
            stream_request = api.StreamTransfersRequest(account_id=account, batch_size=50)
            stream = self.stub.StreamTransfers(stream_request, timeout=DEADLINE)
            return await record_stream(kind, noting_stream(stream, errors))
        source, target = rng.sample(self.ids, 2)
        transfer = api.TransferRequest(
            from_account_id=source,
            to_account_id=target,
            amount=f"{rng.randint(1, 100) / 100:.2f}",
            request_id=f"outage-{next(self.sequence)}",
        )
        sent = self.stub.Transfer(transfer, timeout=DEADLINE)
        return await record(kind, noting(sent, errors), transfer)

    async def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stopped.is_set():
            self.calls.append(await self.one_call(rng))
            await asyncio.sleep(0.01)

    def between(self, start: float, end: float) -> list[Call]:
        return [c for c in self.calls if c.started >= start and c.ended <= end]


async def stop_database(own_pg: OwnPostgres) -> None:
    await asyncio.to_thread(own_pg.stop, "immediate")


async def start_database(own_pg: OwnPostgres) -> None:
    await asyncio.to_thread(own_pg.start)


async def test_outage_answers_unavailable_and_recovers_without_losing_a_transfer(
    own_pg: OwnPostgres,
    served: OwnServer,
    own_engine: AsyncEngine,
) -> None:
    account_ids = await open_accounts(served.channel, 4)
    traffic = Traffic(served.channel, account_ids)
    clients = [asyncio.create_task(traffic.client(seed)) for seed in range(4)]
    try:
        await asyncio.sleep(1.0)
        down = time.monotonic()
        await stop_database(own_pg)
        stopped = time.monotonic()
        await asyncio.sleep(OUTAGE)
        restarting = time.monotonic()
        await start_database(own_pg)
        up = time.monotonic()
        await asyncio.sleep(RECOVERY + 2.0)
    finally:
        traffic.stopped.set()
        await asyncio.wait_for(asyncio.gather(*clients), DEADLINE + 5)

    codes = Counter(c.code.name for c in traffic.calls)
    # Never INTERNAL or UNKNOWN, never a hang (DEADLINE_EXCEEDED): only success or UNAVAILABLE.
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] > 0

    during = traffic.between(stopped, restarting)
    assert during, "no call ran entirely during the outage"
    assert {c.code for c in during} == {grpc.StatusCode.UNAVAILABLE}
    assert {c.method for c in during} >= {"GetAccount", "Transfer"}
    assert all(c.started >= down for c in during)
    # Every UNAVAILABLE (in flight when the database died, during the outage, while it started
    # up again) says why and when to retry: DATABASE_UNAVAILABLE with a RetryInfo delay.
    failed = [c for c in traffic.calls if not c.ok]
    hints = Counter(traffic.hint(c) for c in failed)
    assert set(hints) == {DATABASE_UNAVAILABLE}, hints

    # Within 5 s of the database accepting connections again, calls succeed; after that, all do.
    recovered = [c for c in traffic.calls if c.started >= up and c.ok]
    assert recovered and min(c.ended for c in recovered) <= up + RECOVERY
    late = [c for c in traffic.calls if c.started >= up + RECOVERY]
    assert late and all(c.ok for c in late), Counter(c.code.name for c in late)

    # No transfer lost or applied twice: every OK transfer is stored once, as answered, and a
    # retry of every transfer request (answered or not) returns one stored result.
    transfers = [c for c in traffic.calls if c.method == "Transfer"]
    stub = account_service_pb2_grpc.AccountServiceStub(served.channel)
    for call in transfers:
        again = await stub.Transfer(call.request, timeout=DEADLINE)
        if call.ok:
            assert again == call.response
        assert again.request_id == call.request.request_id
    async with own_engine.connect() as conn:
        stored = Counter(
            (
                await conn.execute(
                    select(Transfer.request_id).where(Transfer.request_id.startswith("outage-"))
                )
            )
            .scalars()
            .all()
        )
    assert stored == Counter(c.request.request_id for c in transfers)
    await assert_balances_match_transfers(own_engine, account_ids, START_BALANCE, "outage-")


async def health_status(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
    return int(reply.status)


async def wait_for_status(channel: grpc.aio.Channel, status: int, bound: float) -> float:
    """Seconds until Health Check reports `status`; fails after `bound` seconds."""
    start = time.monotonic()
    while await health_status(channel) != status:
        if time.monotonic() - start > bound:
            raise AssertionError(f"health did not become {status} within {bound} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def test_health_goes_not_serving_during_outage_and_back(
    own_pg: OwnPostgres, served: OwnServer
) -> None:
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    await wait_for_status(served.channel, serving, bound=10.0)
    await stop_database(own_pg)
    try:
        await wait_for_status(served.channel, not_serving, bound=10.0)
    finally:
        await start_database(own_pg)
    await wait_for_status(served.channel, serving, bound=10.0)
