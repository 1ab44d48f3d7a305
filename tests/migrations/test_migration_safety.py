"""The migration environment's guarantees: lock_timeout holds in every migration's transaction
and inside autocommit blocks, the timeouts reach the --sql script, and `python -m service
migrate` is safe to run twice and concurrently (advisory lock)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.db.engine import create_unpooled_engine
from service.db.migration_safety import MIGRATION_LOCK_ID
from tests.migrations.conftest import current_revisions
from tests.process import ROOT, service_env


@contextmanager
def table_locked_elsewhere(url: str, table: str) -> Iterator[None]:
    """Another session holds ACCESS SHARE on `table` (as any open read transaction would) for
    the block: DDL on that table cannot get its ACCESS EXCLUSIVE lock until the block ends."""
    loop = asyncio.new_event_loop()
    engine = create_unpooled_engine(url)
    conn = loop.run_until_complete(engine.connect())
    transaction = loop.run_until_complete(conn.begin())
    loop.run_until_complete(conn.execute(text(f"LOCK TABLE {table} IN ACCESS SHARE MODE")))
    try:
        yield
    finally:
        loop.run_until_complete(transaction.rollback())
        loop.run_until_complete(conn.close())
        loop.run_until_complete(engine.dispose())
        loop.close()


@pytest.mark.parametrize(
    ("target", "where"),
    [
        ("0003", "in the migration's transaction"),
        ("0005", "inside an autocommit block"),
    ],
)
def test_lock_timeout_holds_in_every_migration(
    scratch_url: str,
    scratch_config: Config,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    where: str,
) -> None:
    # The SETs run and commit before the first migration: a session-level SET survives that
    # commit; a SET LOCAL would not, and the DDL below would wait for the lock indefinitely.
    monkeypatch.setenv("SHOP_MIGRATION_LOCK_TIMEOUT", "200ms")
    before = ScriptDirectory.from_config(scratch_config).get_revision(target).down_revision
    assert isinstance(before, str)
    command.upgrade(scratch_config, before)

    with table_locked_elsewhere(scratch_url, "orders"), pytest.raises(DBAPIError) as failed:
        command.upgrade(scratch_config, target)

    assert "lock timeout" in str(failed.value), where
    assert current_revisions(scratch_url) == {before}
    # Nothing was left half done: the same upgrade succeeds once the lock is gone.
    command.upgrade(scratch_config, target)
    assert current_revisions(scratch_url) == {target}


def test_sql_script_starts_with_the_configured_timeouts(
    scratch_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_MIGRATION_LOCK_TIMEOUT", "1500ms")
    monkeypatch.setenv("SHOP_MIGRATION_STATEMENT_TIMEOUT", "2min")
    scratch_config.stdout = buffer = io.StringIO()
    with redirect_stdout(buffer):
        command.upgrade(scratch_config, "head", sql=True)
    statements = [s.strip() for s in buffer.getvalue().split(";") if s.strip()]
    assert statements[:2] == ["SET lock_timeout = '1500ms'", "SET statement_timeout = '2min'"]
    assert "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_status_id" in buffer.getvalue()


def test_a_bad_timeout_is_refused_before_any_sql(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.config import Settings

    monkeypatch.setenv("SHOP_MIGRATION_LOCK_TIMEOUT", "5s'; DROP TABLE orders; --")
    with pytest.raises(ValidationError, match="migration_lock_timeout"):
        Settings()


def _migrate(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "migrate"],
        cwd=ROOT,
        env=service_env(url, 0),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextmanager
def migration_lock_held(url: str) -> Iterator[Callable[[], int]]:
    """This test holds the migrations' advisory lock for the block, as a running migrate would.
    Yields a function counting the database's other sessions: a `migrate` run opens one
    connection, and until it has the lock it runs nothing on it but the lock poll."""
    loop = asyncio.new_event_loop()
    engine = create_unpooled_engine(url)
    conn = loop.run_until_complete(engine.connect())
    lock = {"id": MIGRATION_LOCK_ID}
    loop.run_until_complete(conn.execute(text("SELECT pg_advisory_lock(:id)"), lock))
    loop.run_until_complete(conn.commit())
    polling = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )

    def waiting() -> int:
        count = loop.run_until_complete(conn.execute(polling)).scalar_one()
        # A new snapshot of pg_stat_activity for the next look.
        loop.run_until_complete(conn.commit())
        return int(count)

    try:
        yield waiting
    finally:
        loop.run_until_complete(conn.execute(text("SELECT pg_advisory_unlock(:id)"), lock))
        loop.run_until_complete(conn.close())
        loop.run_until_complete(engine.dispose())
        loop.close()


def test_concurrent_migrates_on_a_fresh_database_both_succeed(
    scratch_url: str, scratch_config: Config
) -> None:
    # Without the advisory lock both would try CREATE TABLE alembic_version and the first
    # migration; one would fail with a duplicate table or a unique violation. Started side by
    # side, one run could finish before the other connects; so this test holds the lock until
    # both runs are polling for it. From then on each has to get past the other: the overlap
    # is certain, not a matter of timing.
    with migration_lock_held(scratch_url) as waiting:
        first, second = _migrate(scratch_url), _migrate(scratch_url)
        deadline = time.monotonic() + 120
        while waiting() < 2:
            for run in (first, second):
                if run.poll() is not None:
                    pytest.fail(f"migrate ended while the lock was held:\n{run.communicate()[0]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{waiting()} of 2 migrate runs reached the lock in 120s")
            time.sleep(0.1)
        # Both wait; neither has written a thing.
        assert current_revisions(scratch_url) == set()
    outputs = [p.communicate(timeout=180)[0] for p in (first, second)]

    assert [first.returncode, second.returncode] == [0, 0], "\n".join(outputs)
    # Each revision was applied once, by one of the two runs.
    applied = [line for out in outputs for line in out.splitlines() if "Running upgrade" in line]
    heads = set(ScriptDirectory.from_config(scratch_config).get_heads())
    revisions = list(ScriptDirectory.from_config(scratch_config).walk_revisions())
    assert len(applied) == len(revisions), "\n".join(outputs)
    assert current_revisions(scratch_url) == heads
    # And once more, at head already: nothing to do, still status 0.
    again = _migrate(scratch_url)
    assert again.wait(timeout=120) == 0
    assert current_revisions(scratch_url) == heads


async def test_change_log_migration_waits_for_a_reader_without_deadlocking_it(
    scratch_url: str, scratch_config: Config
) -> None:
    """0007 changes four tables in use. A read transaction holding orders that then reads users
    (GetOrder does: the order, then its user) must not deadlock with it: the migration holds one
    table's lock at a time, so it waits for the reader, and the reader never waits for it."""
    await asyncio.to_thread(command.upgrade, scratch_config, "0006")
    engine = create_unpooled_engine(scratch_url)
    try:
        async with engine.connect() as reader, engine.connect() as watcher:
            await reader.execute(text("SELECT count(*) FROM orders"))  # ACCESS SHARE, held
            upgrade = asyncio.create_task(
                asyncio.to_thread(command.upgrade, scratch_config, "0007")
            )
            waiting = text(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'orders'::regclass"
            )
            for _ in range(200):  # bounded: 10 s
                if (await watcher.execute(waiting)).scalar_one():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the migration never waited for the reader's lock on orders")
            # Past PostgreSQL's deadlock_timeout (1 s): a cycle would be found and broken by now.
            await asyncio.sleep(1.5)
            await reader.execute(text("SELECT count(*) FROM users"))
            await reader.commit()
            await asyncio.wait_for(upgrade, 30)
    finally:
        await engine.dispose()
    assert await asyncio.to_thread(current_revisions, scratch_url) == {"0007"}
