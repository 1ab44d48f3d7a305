"""Jepsen's bank test over gRPC: 16 clients move money at random, re-send requests (the same one
concurrently, or the same request_id with another amount), while a reader checks that every
snapshot holds the same total and, for each account, a balance equal to what its transfers
brought in minus what they took out."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

import grpc
from google.rpc import error_details_pb2, status_pb2
from shop.v1 import account_service_pb2 as api
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Account
from tests.factories import Factory
from tests.ledger import assert_ledger_balances, customer_transfers, transfer_sums
from tests.rpc import failure_of
from tests.servers import own_server

ACCOUNTS = 10
OPENING = Decimal("100.00")
CLIENTS = 16
OPERATIONS = 10
BOUND_SECONDS = 60
EXPECTED_FAILURES = {
    ("FAILED_PRECONDITION", "INSUFFICIENT_FUNDS"),
    ("ALREADY_EXISTS", "REQUEST_ID_REUSED"),
}


@dataclass
class History:
    outcomes: Counter[tuple[str, str | None]] = field(default_factory=Counter)
    # request_id -> every (amount sent, response) that came back "ok"
    ok: dict[str, list[tuple[str, api.TransferRequest]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    reused_after_success: int = 0


async def send(stub, request: api.TransferRequest, history: History):
    try:
        response = await stub.Transfer(request)
    except grpc.aio.AioRpcError as error:
        failure = failure_of(error)
        history.outcomes[(failure.code.name, failure.reason)] += 1
        return None
    history.outcomes[("ok", None)] += 1
    history.ok[request.request_id].append((request.amount, response))
    return response


async def send_batch(stub, requests: list[api.TransferRequest], history: History) -> None:
    """A BatchTransfer: each item's result counts as a Transfer's would."""
    response = await stub.BatchTransfer(api.BatchTransferRequest(requests=requests))
    for request, result in zip(requests, response.results, strict=True):
        if result.WhichOneof("result") == "transfer":
            history.outcomes[("ok", None)] += 1
            history.ok[request.request_id].append((request.amount, result.transfer))
        else:
            code = grpc.StatusCode(
                next(c for c in grpc.StatusCode if c.value[0] == result.error.code)
            )
            history.outcomes[(code.name, reason_of(result.error))] += 1


def reason_of(status: status_pb2.Status) -> str | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def random_transfer(rng: random.Random, ids: list[int]) -> api.TransferRequest:
    source, target = rng.sample(ids, 2)
    return api.TransferRequest(
        from_account_id=source,
        to_account_id=target,
        amount=f"{rng.randint(1, 3000) / 100:.2f}",
        request_id=f"bank-{uuid.uuid4().hex}",
    )


async def client(stub, ids: list[int], seed: int, history: History) -> None:
    rng = random.Random(seed)
    for _ in range(OPERATIONS):
        request = random_transfer(rng, ids)
        roll = rng.random()
        if roll < 0.15:  # a batch of three, sent twice at once: each item applied once
            batch = [request, random_transfer(rng, ids), random_transfer(rng, ids)]
            await asyncio.gather(*(send_batch(stub, batch, history) for _ in range(2)))
        elif roll < 0.3:  # the same request, three times at once: applied once
            await asyncio.gather(*(send(stub, request, history) for _ in range(3)))
        elif roll < 0.45:  # the same request_id with another amount, after a success
            if await send(stub, request, history) is not None:
                other = api.TransferRequest()
                other.CopyFrom(request)
                other.amount = f"{Decimal(request.amount) + Decimal('0.01'):.2f}"
                assert await send(stub, other, history) is None
                history.reused_after_success += 1
        else:
            await send(stub, request, history)


@dataclass
class Snapshots:
    taken: int = 0
    totals: set[Decimal] = field(default_factory=set)
    lowest: Decimal = OPENING
    drift: list[object] = field(default_factory=list)


async def take_snapshot(engine: AsyncEngine, ids: list[int], snapshots: Snapshots) -> None:
    """One REPEATABLE READ transaction: total, lowest balance, balance vs the journal."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            balances = dict(
                (
                    await conn.execute(
                        select(Account.id, Account.balance).where(Account.id.in_(ids))
                    )
                ).all()
            )
            entries = dict((await conn.execute(transfer_sums(ids))).all())
    snapshots.taken += 1
    snapshots.totals.add(sum(balances.values(), Decimal(0)))
    snapshots.lowest = min(snapshots.lowest, *balances.values())
    if balances != entries:
        snapshots.drift.append((balances, entries))


async def reader(engine: AsyncEngine, ids: list[int], done: asyncio.Event, s: Snapshots) -> None:
    while not done.is_set():
        await take_snapshot(engine, ids, s)
        await asyncio.sleep(0.05)
    await take_snapshot(engine, ids, s)


async def test_bank(account_stub, factory: Factory, sessions, engine: AsyncEngine) -> None:
    await run_bank(account_stub, factory, sessions, engine)


async def test_bank_with_pool_overflow_logs_no_error(
    database_url: str, factory: Factory, sessions, engine: AsyncEngine, caplog
) -> None:
    """The same load, with GetAccount calls beside it, on a server whose pool must overflow
    (one pooled connection for the money writer's batches and the point reads' batches,
    overflow ones closed on return): every connection comes and goes under SQLAlchemy's
    control, so nothing is logged at WARNING or above (no 'Exception closing connection')."""
    caplog.set_level(logging.WARNING)
    async with own_server(database_url, pool_size=1, max_overflow=8) as server:
        caplog.clear()  # the server's start-up warnings are not the load's
        pool = server.running.engine.sync_engine.pool
        out, most = 0, 0

        def checkout(*_: object) -> None:
            nonlocal out, most
            out += 1
            most = max(most, out)

        def checkin(*_: object) -> None:
            nonlocal out
            out -= 1

        event.listen(pool, "checkout", checkout)
        event.listen(pool, "checkin", checkin)
        done = asyncio.Event()
        watched = await factory.account(balance="1.00")

        async def balances_read() -> None:
            while not done.is_set():
                await server.accounts.GetAccount(api.GetAccountRequest(id=watched.id))

        readers = [asyncio.ensure_future(balances_read()) for _ in range(4)]
        try:
            await run_bank(server.accounts, factory, sessions, engine)
        finally:
            done.set()
            await asyncio.gather(*readers)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]
    assert most > 1, "the pool never overflowed: the test did not test it"
    assert out == 0


async def run_bank(account_stub, factory: Factory, sessions, engine: AsyncEngine) -> None:
    ids = [(await factory.account(balance=str(OPENING))).id for _ in range(ACCOUNTS)]
    total = OPENING * ACCOUNTS
    history, snapshots, done = History(), Snapshots(), asyncio.Event()

    watcher = asyncio.ensure_future(reader(engine, ids, done, snapshots))
    try:
        await asyncio.wait_for(
            asyncio.gather(*(client(account_stub, ids, seed, history) for seed in range(CLIENTS))),
            BOUND_SECONDS,
        )
    finally:
        done.set()
        await watcher

    # No client ever saw anything but a success or a deliberate refusal.
    failures = {kind for kind in history.outcomes if kind[0] != "ok"}
    assert failures <= EXPECTED_FAILURES, history.outcomes
    assert history.outcomes[("ok", None)] > 0
    assert history.reused_after_success > 0
    # Only the re-sends with another amount were refused as reused: identical re-sends, even
    # concurrent ones, got the stored answer.
    reused = history.outcomes[("ALREADY_EXISTS", "REQUEST_ID_REUSED")]
    assert reused == history.reused_after_success

    # Every snapshot: the same total, no negative balance, balances = transfers in - out.
    assert snapshots.taken >= 1
    assert snapshots.totals == {total}
    assert snapshots.lowest >= 0
    assert snapshots.drift == []

    # Every request_id applied at most once, with the amount of the request that got "ok",
    # and every "ok" for one request_id carried the very same transfer.
    async with sessions() as session:
        rows = (await session.scalars(customer_transfers())).all()
    per_request = Counter(row.request_id for row in rows)
    assert set(per_request.values()) == {1}
    assert set(per_request) == set(history.ok)
    for row in rows:
        answers = history.ok[row.request_id]
        assert {response.id for _, response in answers} == {row.id}
        assert {amount for amount, _ in answers} == {f"{row.amount:.2f}"}

    # The final balances replay from the journal, to the cent.
    expected = dict.fromkeys(ids, OPENING)
    for row in rows:
        expected[row.from_account_id] -= row.amount
        expected[row.to_account_id] += row.amount
    async with sessions() as session:
        final = dict(
            (
                await session.execute(
                    select(Account.id, Account.balance).where(Account.id.in_(ids))
                )
            ).all()
        )
    assert final == expected
    assert sum(final.values()) == total
    await assert_ledger_balances(sessions)
