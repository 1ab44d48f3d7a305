"""Shared by the stream tests: bulk users and waiting for the server's database sessions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

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
