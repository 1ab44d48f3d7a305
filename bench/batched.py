"""A baseline for the money writer: its batch's statements, sent back to back from one
connection with no gRPC and no protobuf. Per batch, in one transaction: the accounts locked in
id order, the idempotency keys read (which draws the transfer ids), and one statement that
writes balances, journal and the keys with their responses.

The statements are the writer's own (service/repositories/ledger.py), so the baseline always
measures what the service sends. They run on raw asyncpg (the driver alone) or on one
SQLAlchemy AsyncConnection (`execute(text(...))`, the writer's path minus everything around it),
at a given batch size.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import asyncpg

from bench.results import Measurement, percentile
from service.repositories.ledger import APPLY, CLAIM, LOCK

# About the size of a serialized Transfer, as the writer stores it for idempotent replays.
RESPONSE = b"r" * 64
AMOUNT = Decimal("1.00")
RAW = "raw asyncpg"
STATEMENTS_LABEL = "batch statements"
ALCHEMY = "SQLAlchemy AsyncConnection"
_BIND = re.compile(r"(?<![:\w]):(\w+)")


@dataclass(frozen=True)
class Sql:
    """One statement with :name binds, and its asyncpg form with $n and the names in order."""

    named: str
    numbered: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, named: str) -> Sql:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        return cls(named, _BIND.sub(number, named), tuple(names))


STATEMENTS = {
    name: Sql.of(sql.text) for name, sql in (("claim", CLAIM), ("lock", LOCK), ("apply", APPLY))
}


class Runner(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[None]: ...

    async def rows(self, sql: Sql, params: dict[str, Any]) -> Sequence[Sequence[Any]]: ...


class AsyncpgRunner:
    """The statements on the driver alone (prepared and cached by asyncpg)."""

    label = RAW

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    def transaction(self) -> AbstractAsyncContextManager[None]:
        return self.conn.transaction()  # type: ignore[no-any-return]

    async def rows(self, sql: Sql, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        return await self.conn.fetch(sql.numbered, *(params[n] for n in sql.names))  # type: ignore[no-any-return]


class AlchemyRunner:
    """The statements as `text()` on one SQLAlchemy AsyncConnection, as the writer runs them."""

    label = ALCHEMY

    def __init__(self, conn: Any) -> None:
        from sqlalchemy import text

        self.conn = conn
        self.texts = {sql.named: text(sql.named) for sql in STATEMENTS.values()}

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self.conn.begin():
            yield

    async def rows(self, sql: Sql, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        return (await self.conn.execute(self.texts[sql.named], params)).all()  # type: ignore[no-any-return]


async def one_batch(runner: Runner, accounts: list[int], size: int, rng: random.Random) -> int:
    """`size` transfers of 1.00 between random distinct accounts in one transaction; returns
    how many were applied (all of them: fresh request_ids, funded accounts)."""
    pairs = [rng.sample(accounts, 2) for _ in range(size)]
    rids = [f"raw-{uuid.uuid4().hex}" for _ in range(size)]
    async with runner.transaction():
        ids_locked = sorted({a for pair in pairs for a in pair})
        locked = await runner.rows(STATEMENTS["lock"], {"ids": ids_locked})
        balances = {row[0]: row[3] for row in locked}  # LOCK: id, user_id, currency, balance
        claimed = await runner.rows(STATEMENTS["claim"], {"request_ids": sorted(rids)})
        ids = {row[0]: row[3] for row in claimed}  # CLAIM: request_id, hash, response, id
        transfers = []
        for rid, (source, target) in zip(rids, pairs, strict=True):
            transfers.append((ids[rid], source, target, AMOUNT, rid))
            balances[source] -= AMOUNT
            balances[target] += AMOUNT
        await runner.rows(STATEMENTS["apply"], _apply_params(transfers, balances))
    return len(transfers)


def _apply_params(
    transfers: list[tuple[Any, ...]],
    balances: dict[int, Decimal],
) -> dict[str, Any]:
    columns = list(zip(*transfers, strict=True))
    return {
        "account_ids": list(balances),
        "balances": list(balances.values()),
        "transfer_ids": list(columns[0]),
        "from_ids": list(columns[1]),
        "to_ids": list(columns[2]),
        "amounts": list(columns[3]),
        "transfer_request_ids": list(columns[4]),
        "answered_ids": list(columns[4]),
        "hashes": [RESPONSE[:32]] * len(transfers),
        "responses": [RESPONSE] * len(transfers),
    }


async def _drive(
    runner: Runner, accounts: list[int], size: int, seconds: float, warmup: float
) -> tuple[int, float, list[float], float]:
    """Batches back to back. Counts whole batches: from the first one started after the
    warm-up to the first one ending after `seconds` more. Returns the transfers counted, the
    seconds they took, batch latencies, and this process's CPU seconds over it all."""
    rng = random.Random(size)
    latencies: list[float] = []
    counted = 0
    cpu_started = time.process_time()
    begin = time.perf_counter() + warmup
    window_start = done = 0.0
    while True:
        started = time.perf_counter()
        applied = await one_batch(runner, accounts, size, rng)
        done = time.perf_counter()
        if started >= begin:
            window_start = window_start or started
            counted += applied
            latencies.append(done - started)
            if done - window_start >= seconds:
                break
    return counted, done - window_start, sorted(latencies), time.process_time() - cpu_started


async def batched_transfers(
    kind: str, dsn: str, url: str, accounts: list[int], size: int, seconds: float, warmup: float
) -> Measurement:
    """Transfers/s of the writer's batch statements, `size` transfers per batch, on one
    connection: `kind` "asyncpg" (dsn) or "sqlalchemy" (url)."""
    if kind == "asyncpg":
        conn = await asyncpg.connect(dsn)
        try:
            runner: AsyncpgRunner | AlchemyRunner = AsyncpgRunner(conn)
            counted, took, latencies, cpu = await _drive(runner, accounts, size, seconds, warmup)
        finally:
            await conn.close()
    else:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url)
        try:
            async with engine.connect() as sa_conn:
                runner = AlchemyRunner(sa_conn)
                counted, took, latencies, cpu = await _drive(
                    runner, accounts, size, seconds, warmup
                )
        finally:
            await engine.dispose()
    rate = counted / took
    return Measurement(
        f"{runner.label}, {STATEMENTS_LABEL}, {size} per batch",
        rate,
        "transfers/s",
        in_flight=1,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        details=(
            f"one connection, batches of {size} back to back, {counted:,} transfers in "
            f"{took:.2f} s after {warmup:g} s of warm-up; "
            f"p50/p99 per batch; CPU column: this process's per transfer"
        ),
        # This process's CPU per transfer, over the warm-up and window (as Run.load counts it).
        server_cpu_ms=cpu * 1000 / max(1.0, rate * (warmup + took)),
        batch=size,
    )
