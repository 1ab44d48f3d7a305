"""Shared by the stream tests: bulk users, waiting for the server's database sessions, and a
slow reader whose export is cut by its server's shutdown."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


async def insert_users(engine: AsyncEngine, count: int) -> None:
    """`count` users in one statement (the factory's one-by-one inserts would take seconds)."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO users (email, first_name, last_name) "
                "SELECT 'bulk-' || :tag || '-' || g || '@example.com', 'Bulk', 'User' || g "
                "FROM generate_series(1, :count) g"
            ),
            {"count": count, "tag": uuid.uuid4().hex[:8]},
        )


async def session_states(engine: AsyncEngine) -> dict[str, int]:
    """state -> count for every other session of the test database (the server's included)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT coalesce(state, '') AS state, count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() GROUP BY 1"
            )
        )
        return {state: count for state, count in rows}


async def lock_waiters(engine: AsyncEngine) -> int:
    """Sessions of the test database waiting for a lock."""
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            or 0
        )


async def eventually(check: Callable[[], Awaitable[bool]], attempts: int = 400) -> bool:
    """Whether `check` holds within `attempts` tries 50 ms apart: the server ends its work in
    its own tasks, a moment after the client saw the call end. The 20 s cap only tells a
    hang from a moment on a loaded machine; no test here promises a speed."""
    for _ in range(attempts):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


# A slow reader, as a client's channel would be once its buffers are full: grpc's fixed 64 KiB
# window (by default BDP probing grows it to several MB on loopback).
SLOW_READER_OPTIONS = [("grpc.http2.bdp_probe", 0)]
SLOW_READ_PACE = 0.02  # seconds per batch
CUT_WITHIN = 300  # batches: a bound on the reading loop, far past any tail


@dataclass
class CutExport:
    """What a reader of StreamUsers saw up to the end of its call."""

    ids: list[int]
    token: str
    error: grpc.aio.AioRpcError | None


async def read_until_cut(
    address: str, batch_size: int, stop: Callable[[], None], after: int = 5
) -> CutExport:
    """Read StreamUsers slowly through `address`; call `stop()` (a SIGTERM, say) after `after`
    batches and read on until the call ends, keeping the last resume token."""
    ids: list[int] = []
    token = ""
    async with grpc.aio.insecure_channel(address, options=SLOW_READER_OPTIONS) as channel:
        call = user_service_pb2_grpc.UserServiceStub(channel).StreamUsers(
            api.StreamUsersRequest(batch_size=batch_size), timeout=60
        )
        try:
            for read in range(CUT_WITHIN):
                batch = await call.read()
                if batch is grpc.aio.EOF:
                    return CutExport(ids, token, None)
                ids.extend(user.id for user in batch.users)
                token = batch.resume_token
                if read + 1 == after:
                    stop()
                await asyncio.sleep(SLOW_READ_PACE)
        except grpc.aio.AioRpcError as error:
            return CutExport(ids, token, error)
        finally:
            call.cancel()
    raise AssertionError(f"still reading {CUT_WITHIN} batches after the stop")


async def resume(stub: user_service_pb2_grpc.UserServiceStub, token: str) -> list[int]:
    """The rest of the export from `token`, read whole."""
    ids: list[int] = []
    async for batch in stub.StreamUsers(api.StreamUsersRequest(resume_token=token)):
        ids.extend(user.id for user in batch.users)
    return ids
