"""Client-side traffic for fault tests and the soak: calls that record how they ended."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import grpc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Account, Transfer


@dataclass
class Call:
    """One finished RPC: what, when (monotonic seconds) and how it ended."""

    method: str
    started: float
    ended: float
    code: grpc.StatusCode
    request: Any = None
    response: Any = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


async def record(method: str, call: Awaitable[Any], request: Any = None) -> Call:
    """Await a unary call; never raises for an RPC error, returns what happened."""
    started = time.monotonic()
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        return Call(method, started, time.monotonic(), error.code(), request)
    return Call(method, started, time.monotonic(), grpc.StatusCode.OK, request, response)


async def record_stream(method: str, call: Any, request: Any = None) -> Call:
    """Drain a server stream; returns what happened (response: the number of messages)."""
    started = time.monotonic()
    messages = 0
    try:
        async for _ in call:
            messages += 1
    except grpc.aio.AioRpcError as error:
        return Call(method, started, time.monotonic(), error.code(), request, messages)
    return Call(method, started, time.monotonic(), grpc.StatusCode.OK, request, messages)


async def assert_balances_match_transfers(
    engine: AsyncEngine, account_ids: list[int], start: Decimal, prefix: str
) -> None:
    """Each account's balance is its start plus what the transfers with `prefix` moved in and
    out, and the accounts together still hold what they started with: no transfer half applied,
    lost or doubled."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(Account.id, Account.balance).where(Account.id.in_(account_ids))
        )
        balances = {account_id: balance for account_id, balance in rows}
        moves = (
            await conn.execute(
                select(Transfer.from_account_id, Transfer.to_account_id, Transfer.amount).where(
                    Transfer.request_id.startswith(prefix)
                )
            )
        ).all()
    expected = dict.fromkeys(account_ids, start)
    for source, target, amount in moves:
        expected[source] -= amount
        expected[target] += amount
    assert balances == expected
    assert sum(balances.values()) == start * len(account_ids)
