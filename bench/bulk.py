"""Bulk writes through gRPC: UpsertUsers (batches of 1000) and ImportUsers (client streams),
one call at a time, new emails each call, so every row is an insert as in the baselines."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from shop.v1 import user_service_pb2, user_service_pb2_grpc

from bench.results import Measurement
from bench.seed import user_records


def _users(prefix: str, count: int, start: int) -> list[user_service_pb2.UpsertUser]:
    return [
        user_service_pb2.UpsertUser(email=email, first_name=first, last_name=last)
        for email, first, last in user_records(prefix, count, start)
    ]


async def upsert_users(
    target: str, batches: int, batch_size: int, prefix: str = "apiup"
) -> Measurement:
    """`batches` UpsertUsers calls of `batch_size` users each, one at a time; a `prefix` not
    used before makes every row an insert."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        started = time.perf_counter()
        for b in range(batches):
            users = _users(prefix, batch_size, b * batch_size)
            await stub.UpsertUsers(user_service_pb2.UpsertUsersRequest(users=users))
        elapsed = time.perf_counter() - started
    return Measurement(
        "UpsertUsers", batches * batch_size / elapsed, "rows/s", details=f"{batches} x {batch_size}"
    )


def _mixed_users(count: int, start: int) -> list[user_service_pb2.UpsertUser]:
    """Rows start.. of a half-existing import: every other row updates a seeded user (the
    "user" prefix of seed.copy_users, each once), the others are new."""
    users = []
    for i in range(start, start + count):
        if i % 2:
            users += _users("apimix", 1, i)
        else:
            email, _, last = next(user_records("user", 1, i // 2))
            users.append(
                user_service_pb2.UpsertUser(email=email, first_name="Mixed", last_name=last)
            )
    return users


async def import_users(
    target: str, calls: int, rows_per_call: int, message_rows: int, *, mixed: bool = False
) -> Measurement:
    """`calls` ImportUsers calls of `rows_per_call` new users, one at a time; `mixed`: every
    other row an existing (seeded) user instead, interleaved from the first message."""

    async def requests(start: int) -> AsyncIterator[user_service_pb2.ImportUsersRequest]:
        for offset in range(0, rows_per_call, message_rows):
            count = min(message_rows, rows_per_call - offset)
            users = (
                _mixed_users(count, start + offset)
                if mixed
                else _users("apiimp", count, start + offset)
            )
            yield user_service_pb2.ImportUsersRequest(users=users)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        started = time.perf_counter()
        for c in range(calls):
            await stub.ImportUsers(requests(c * rows_per_call))
        elapsed = time.perf_counter() - started
    return Measurement(
        "ImportUsers, half existing" if mixed else "ImportUsers",
        calls * rows_per_call / elapsed,
        "rows/s",
        details=f"{calls} x {rows_per_call:,} rows, {message_rows} per message"
        + (", every other row an existing user" if mixed else ""),
    )
