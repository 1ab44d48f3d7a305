"""A slow consumer holds the server-side cursor back: the server does not buffer the export."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg.cursor
import grpc
import pytest
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from service.serving.server import RunningServer
from tests.streams.helpers import insert_users

USERS = 40_000
BATCH = 100


class FetchCounter:
    """Rows the server pulled from PostgreSQL through asyncpg cursors (the export's portal)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        fetch = asyncpg.cursor.Cursor.fetch

        async def counted(cursor: Any, n: int, **options: Any) -> Any:
            rows = await fetch(cursor, n, **options)
            self.rows += len(rows)
            return rows

        monkeypatch.setattr(asyncpg.cursor.Cursor, "fetch", counted)

    async def settled(self) -> int:
        """The count once it stops moving (the server is blocked on the paused client)."""
        last = -1
        for _ in range(100):
            if self.rows == last:
                return self.rows
            last = self.rows
            await asyncio.sleep(0.1)
        raise AssertionError("the server kept fetching while the client was paused")


async def test_a_paused_client_holds_the_cursor_back(
    server: RunningServer, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    await insert_users(engine, USERS)
    counter = FetchCounter(monkeypatch)
    # No BDP probing: the client's flow-control window stays at its fixed default, as a slow
    # consumer's would once its buffers are full.
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        call = user_service_pb2_grpc.UserServiceStub(channel).StreamUsers(
            api.StreamUsersRequest(batch_size=BATCH)
        )
        first = await call.read()
        assert isinstance(first, api.UserBatch)

        paused_at = await counter.settled()
        # What HTTP/2 flow control and grpc's buffers let through, not the whole table.
        assert BATCH <= paused_at <= USERS // 4

        received = len(first.users)
        while isinstance(batch := await call.read(), api.UserBatch):
            received += len(batch.users)
    assert received == USERS
    assert counter.rows == USERS
