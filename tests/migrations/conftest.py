"""Fixtures for migration tests: a scratch database per test on the run's PostgreSQL, and the
service run as a real process against it."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, make_url

from service.db.engine import create_unpooled_engine
from service.db.migrate import alembic_config
from tests.postgres import fresh_database_on
from tests.process import service_process


@pytest.fixture
def scratch_url(database_url: str) -> Iterator[str]:
    """An empty database of this test's own, on the server the run uses; dropped afterwards."""
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with fresh_database_on(server) as url:
        yield url


@pytest.fixture
def scratch_config(scratch_url: str) -> Config:
    return alembic_config(scratch_url)


def current_revisions(url: str) -> set[str]:
    """What alembic_version holds."""

    def read(connection: Connection) -> set[str]:
        return set(MigrationContext.configure(connection).get_current_heads())

    async def run() -> set[str]:
        engine = create_unpooled_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(read)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@contextmanager
def serving(url: str, log: Path, **extra_env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m service serve` on a free port until SERVING; killed at the end if still up."""
    with service_process(url, log, **extra_env) as served:
        yield served
