"""One holder per cluster: a PostgreSQL session advisory lock, held on a connection of its own
from an unpooled engine. A holder that dies (SIGKILL included) loses its connection and with it
the lock, so a waiting process takes over with no lease to expire and no clock to trust."""

from __future__ import annotations

import asyncio
import hashlib
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db.engine import create_unpooled_engine

log = logging.getLogger(__name__)

_TRY = text("SELECT pg_try_advisory_lock(:key)")
_ALIVE = text("SELECT 1")


def lock_key(name: str) -> int:
    """pg_try_advisory_lock's bigint for `name`: stable across processes and releases."""
    digest = hashlib.blake2b(f"shop-service:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class ClusterLock:
    """Held by at most one process of the cluster at a time (see the module's docstring)."""

    def __init__(self, url: str, name: str, timeout: float) -> None:
        self.name = name
        self.key = lock_key(name)
        self._timeout = timeout
        self._engine = create_unpooled_engine(url)
        self._connection: AsyncConnection | None = None

    async def acquire(self, retry: float) -> None:
        """Return once this process holds the lock, trying again every `retry` seconds.
        Polled, not a blocking pg_advisory_lock: no statement waits on a connection that may
        have died meanwhile, and each try is its own short transaction (no snapshot held)."""
        waiting = False
        while True:
            try:
                if await self._try():
                    log.info("holding the %s lock", self.name)
                    return
                if not waiting:
                    log.info("another process holds the %s lock; waiting for it", self.name)
                    waiting = True
            except Exception as exc:  # the database away, a failover: try again
                log.warning("taking the %s lock failed (%s); retrying", self.name, exc)
                await self.release()
            await asyncio.sleep(retry)

    async def _try(self) -> bool:
        async with asyncio.timeout(self._timeout):
            if self._connection is None:
                self._connection = await self._engine.connect()
            held = (await self._connection.execute(_TRY, {"key": self.key})).scalar_one()
            await self._connection.commit()
        return bool(held)

    async def check(self) -> None:
        """Raise when the lock's connection no longer answers: the lock is then as good as
        lost (PostgreSQL drops it with the session), so the holder must stop."""
        if self._connection is None:
            raise ConnectionError(f"the {self.name} lock is not held")
        async with asyncio.timeout(self._timeout):
            await self._connection.execute(_ALIVE)
            await self._connection.commit()

    async def release(self) -> None:
        """Close the connection: the lock, if held, goes with it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    await connection.close()
            except Exception as exc:  # closed or dead already: nothing is held either way
                log.info("closing the %s lock's connection: %s", self.name, exc)
                await connection.invalidate()

    async def dispose(self) -> None:
        await self.release()
        await self._engine.dispose()
