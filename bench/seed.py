"""Test data: users by COPY (fast, straight into the table), accounts through the public API
(OpenAccount + Deposit), so the seed survives changes to the ledger's schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import grpc
from shop.v1 import account_service_pb2, account_service_pb2_grpc

USER_COLUMNS = ("email", "first_name", "last_name")


def user_records(prefix: str, count: int, start: int = 0) -> Iterator[tuple[str, str, str]]:
    for i in range(start, start + count):
        yield (f"{prefix}{i:07d}@bench.example", f"First{i}", f"Last{i}")


async def copy_users(dsn: str, count: int) -> int:
    """COPY `count` users into an empty users table (ids 1..count); returns the largest id."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "users", records=user_records("user", count), columns=USER_COLUMNS
        )
        # Hint bits and the visibility map set now, so neither reader pays for them later.
        await conn.execute("VACUUM (ANALYZE) users")
        return int(await conn.fetchval("SELECT max(id) FROM users"))
    finally:
        await conn.close()


async def open_funded_accounts(target: str, user_ids: list[int], amount: str) -> list[int]:
    """One EUR account per user, each funded with `amount`; returns the account ids."""
    limit = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = account_service_pb2_grpc.AccountServiceStub(channel)

        async def open_one(user_id: int) -> int:
            async with limit:
                account = await stub.OpenAccount(
                    account_service_pb2.OpenAccountRequest(
                        user_id=user_id, currency="EUR", request_id=f"bench-open-{user_id}"
                    )
                )
                await stub.Deposit(
                    account_service_pb2.DepositRequest(
                        account_id=account.id, amount=amount, request_id=f"bench-fund-{user_id}"
                    )
                )
                return int(account.id)

        return list(await asyncio.gather(*(open_one(u) for u in user_ids)))
