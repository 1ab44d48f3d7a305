"""Failover under the bank load. 16 callers send Transfers with request_ids to a real server
whose SHOP_DATABASE_URL names both Patroni nodes (target_session_attrs=read-write); each retries
UNAVAILABLE (and a deadline that passed) with the SAME request_id. The primary's postmaster is
killed (SIGKILL); Patroni promotes the synchronous standby; the callers go on. Then, read on
the new primary: every acknowledged transfer is there exactly once, none twice, totals are
conserved, no balance is negative; and calls succeed again within RECOVERY_BOUND of the kill.

Figures (docs/reliability.md) are printed; run with -s to see them."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import grpc
import pytest_asyncio
from shop.v1 import account_service_pb2 as api
from shop.v1 import account_service_pb2_grpc, resources_pb2
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.patroni.cluster import TTL, Cluster, Node
from service.db.engine import create_sessionmaker, create_unpooled_engine
from service.db.models import Account, Transfer
from tests.factories import Factory
from tests.faults.retry_info import DATABASE_UNAVAILABLE, retry_hint
from tests.faults.traffic import Call, assert_balances_match_transfers
from tests.ledger import assert_ledger_balances
from tests.process import Served

CALLERS = 16
ACCOUNTS = 8
START_BALANCE = Decimal("1000.00")
PREFIX = "failover-"
CALL_DEADLINE = 5.0  # each attempt; one that hangs ends DEADLINE_EXCEEDED and is retried
RETRY_PAUSE = 0.2  # shorter than the 1 s RetryInfo asks for: recovery is measured to 0.2 s
GIVE_UP = 40.0  # a request still failing this long after its first attempt is given up
LOAD_BEFORE = 3.0  # seconds of transfers before the kill
LOAD_AFTER = 3.0  # seconds of transfers after calls succeed again
# The stated guarantee: calls succeed again within Patroni's ttl plus 2 s of the primary's
# death. Measured: the standby promoted within about 2 s, calls succeeded about 3 s after the
# kill (docs/reliability.md); the bound leaves a loaded 2-core machine room.
RECOVERY_BOUND = TTL + 2.0
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class Attempt:
    call: Call
    hint: tuple[grpc.StatusCode, str | None, bool] | None = None  # a failure's status details


@dataclass
class Load:
    """What the callers did: every attempt, and what each request finally got."""

    stub: account_service_pb2_grpc.AccountServiceStub
    account_ids: list[int]
    attempts: list[Attempt] = field(default_factory=list)
    acknowledged: dict[str, tuple[api.TransferRequest, resources_pb2.Transfer]] = field(
        default_factory=dict
    )
    refused: Counter[str] = field(default_factory=Counter)  # final non-OK outcomes, by reason
    given_up: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def attempt(self, request: api.TransferRequest) -> Attempt:
        started = time.monotonic()
        try:
            reply = await self.stub.Transfer(request, timeout=CALL_DEADLINE)
        except grpc.aio.AioRpcError as error:
            call = Call("Transfer", started, time.monotonic(), error.code(), request)
            return Attempt(call, retry_hint(error))
        ok = grpc.StatusCode.OK
        return Attempt(Call("Transfer", started, time.monotonic(), ok, request, reply))

    async def send(self, request: api.TransferRequest) -> None:
        """One request until it gets an answer other than UNAVAILABLE, the same request_id
        every time; bounded by GIVE_UP."""
        first = time.monotonic()
        while True:
            attempt = await self.attempt(request)
            self.attempts.append(attempt)
            call = attempt.call
            if call.ok:
                self.acknowledged[request.request_id] = (request, call.response)
                return
            if call.code not in RETRIED:
                assert attempt.hint is not None
                self.refused[f"{call.code.name} {attempt.hint[1]}"] += 1
                return
            if time.monotonic() - first > GIVE_UP:
                self.given_up.append(request.request_id)
                return
            await asyncio.sleep(RETRY_PAUSE)

    async def caller(self, n: int) -> None:
        rng = random.Random(n)
        sequence = 0
        while not self.stop.is_set():
            source, target = rng.sample(self.account_ids, 2)
            request = api.TransferRequest(
                from_account_id=source,
                to_account_id=target,
                amount=f"{rng.randint(1, 5000) / 100:.2f}",
                request_id=f"{PREFIX}{n}-{sequence}",
            )
            sequence += 1
            await self.send(request)


@pytest_asyncio.fixture
async def cluster_engine(patroni: Cluster) -> AsyncIterator[AsyncEngine]:
    engine = create_unpooled_engine(patroni.url())
    yield engine
    await engine.dispose()


async def open_accounts(engine: AsyncEngine) -> list[int]:
    factory = Factory(create_sessionmaker(engine))
    user = await factory.user()
    accounts = [await factory.account(user, balance=str(START_BALANCE)) for _ in range(ACCOUNTS)]
    return [account.id for account in accounts]


async def promoted(cluster: Cluster, old: Node, bound: float) -> float:
    """Monotonic time at which Patroni first reports another node as the running leader."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        leader = await asyncio.to_thread(cluster.leader)
        if leader is not None and leader is not old:
            return time.monotonic()
        await asyncio.sleep(0.1)
    raise AssertionError(f"no new leader within {bound:.0f}s: {cluster.roles()}")


async def calls_succeed_again(load: Load, since: float, bound: float) -> float:
    """Monotonic time at which an attempt started after `since` first succeeded."""
    deadline = since + bound + CALL_DEADLINE
    while time.monotonic() < deadline:
        ended = [a.call.ended for a in load.attempts if a.call.ok and a.call.started > since]
        if ended:
            return min(ended)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no call succeeded within {bound:.0f}s of {since:.1f}")


async def test_failover_loses_no_acknowledged_transfer(
    patroni: Cluster, ha_served: Served, cluster_engine: AsyncEngine
) -> None:
    old_leader, _standby = patroni.wait_ready()
    load = Load(
        account_service_pb2_grpc.AccountServiceStub(ha_served.channel),
        await open_accounts(cluster_engine),
    )
    callers = [asyncio.create_task(load.caller(n)) for n in range(CALLERS)]
    try:
        await asyncio.sleep(LOAD_BEFORE)
        pid = old_leader.postmaster_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        new_primary_at = await promoted(patroni, old_leader, RECOVERY_BOUND + 10)
        # The first success that started after the promotion was seen: no earlier success
        # could be on the old primary, and none before it is counted as recovery.
        succeeded_at = await calls_succeed_again(load, new_primary_at, RECOVERY_BOUND)
        await asyncio.sleep(LOAD_AFTER)
    finally:
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*callers), GIVE_UP + 2 * CALL_DEADLINE)

    new_leader = patroni.leader()
    assert new_leader is not None and new_leader is not old_leader

    # Every failure told the client to retry (ErrorInfo and RetryInfo), none was INTERNAL,
    # no request ran out of retries, and once the new primary served, calls succeeded.
    errors = Counter(a.call.code.name for a in load.attempts if not a.call.ok)
    assert set(errors) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION"}, errors
    unavailable = [a for a in load.attempts if a.call.code == grpc.StatusCode.UNAVAILABLE]
    assert unavailable, "the kill was not seen by any call"
    assert all(a.hint == DATABASE_UNAVAILABLE for a in unavailable)
    assert set(load.refused) <= {"FAILED_PRECONDITION INSUFFICIENT_FUNDS"}, load.refused
    assert load.given_up == []
    assert succeeded_at - killed <= RECOVERY_BOUND
    late = [
        a.call
        for a in load.attempts
        if a.call.code in RETRIED and a.call.started > killed + RECOVERY_BOUND
    ]
    assert late == [], f"{len(late)} calls failed after {RECOVERY_BOUND:.0f}s"

    await assert_survived(patroni.node_url(new_leader), load)
    report(load, killed, new_primary_at, succeeded_at)


async def assert_survived(new_primary_url: str, load: Load) -> None:
    """On the new primary: each acknowledged transfer once, as acknowledged; the money adds up."""
    engine = create_unpooled_engine(new_primary_url)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT NOT pg_is_in_recovery()"))
            rows = (
                await conn.execute(
                    select(
                        Transfer.request_id,
                        func.count(),
                        func.min(Transfer.id),
                        func.min(Transfer.amount),
                        func.min(Transfer.from_account_id),
                        func.min(Transfer.to_account_id),
                    )
                    .where(Transfer.request_id.startswith(PREFIX))
                    .group_by(Transfer.request_id)
                )
            ).all()
            negative = await conn.scalar(
                select(func.count()).where(Account.id.in_(load.account_ids), Account.balance < 0)
            )
        ledger = {row[0]: row[1:] for row in rows}
        assert all(count == 1 for count, *_ in ledger.values()), "a request_id applied twice"
        lost = [rid for rid in load.acknowledged if rid not in ledger]
        assert lost == [], f"{len(lost)} acknowledged transfers lost"
        for request_id, (request, reply) in load.acknowledged.items():
            _count, transfer_id, amount, source, target = ledger[request_id]
            assert (transfer_id, source, target) == (
                reply.id,
                request.from_account_id,
                request.to_account_id,
            )
            assert amount == Decimal(request.amount)
        assert negative == 0
        await assert_balances_match_transfers(engine, load.account_ids, START_BALANCE, PREFIX)
        await assert_ledger_balances(create_sessionmaker(engine))
    finally:
        await engine.dispose()


def report(load: Load, killed: float, promoted_at: float, succeeded_at: float) -> None:
    errors = Counter(a.call.code.name for a in load.attempts if not a.call.ok)
    failing = [a.call for a in load.attempts if a.call.code in RETRIED]
    print(
        f"\nfailover figures: {CALLERS} callers, {len(load.attempts)} Transfer calls "
        f"({len(load.acknowledged)} acknowledged, {sum(load.refused.values())} refused: "
        f"{dict(load.refused)}); errors by code {dict(errors)}; "
        f"no primary for {promoted_at - killed:.1f} s (kill to Patroni's new leader); "
        f"calls succeed again {succeeded_at - killed:.1f} s after the kill; "
        f"last retryable error ended {max(c.ended for c in failing) - killed:.1f} s after it; "
        f"acknowledged transfers lost: 0, applied twice: 0"
    )
