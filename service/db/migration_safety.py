"""What every migration run does before its first DDL (alembic/env.py calls these): take the
migration advisory lock, so concurrent `migrate` runs apply each revision once, then set
lock_timeout and statement_timeout, so DDL that cannot get its lock fails fast instead of
queueing behind a long transaction while every query on that table queues behind it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Connection

# pg_advisory_lock takes a bigint; any fixed value works as long as nothing else in the
# database uses it. Spelled as bytes so it is recognisable in pg_locks (objid/classid halves).
MIGRATION_LOCK_ID = int.from_bytes(b"shopmigr", "big")
LOCK_POLL_SECONDS = 0.2

log = logging.getLogger(__name__)


@contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """Hold the session-level advisory lock for the block. Session level (not xact): it must
    outlive the commits of transaction_per_migration and of autocommit blocks."""
    _acquire(connection)
    try:
        yield
    finally:
        # After a failed migration the connection may be in an aborted transaction: roll it back
        # so the unlock can run. (Closing the connection would release the lock too.)
        connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()


def _acquire(connection: Connection) -> None:
    """Poll pg_try_advisory_lock, one short transaction per try. Not a blocking
    pg_advisory_lock: the transaction waiting in it holds a snapshot, CREATE INDEX CONCURRENTLY
    in the running migration waits for every older snapshot, and PostgreSQL reports a deadlock.
    No lock_timeout either: the second migrate waits for the first, however long it takes."""
    waiting = False
    while True:
        acquired = connection.execute(
            text("SELECT pg_try_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID}
        ).scalar_one()
        connection.commit()
        if acquired:
            return
        if not waiting:
            log.info("another migration is running; waiting for it to finish")
            waiting = True
        # Blocking sleep on purpose: this runs inside run_sync in a process that does nothing
        # else, and it is between transactions, so no snapshot is held while waiting.
        time.sleep(LOCK_POLL_SECONDS)


def timeout_statements(lock_timeout: str, statement_timeout: str) -> list[str]:
    """The SET statements, as text: env.py runs them online and writes them into --sql output.
    Plain SET (session level), not SET LOCAL: they must hold for every migration's transaction
    and inside autocommit blocks, not just the transaction that sets them."""
    return [
        f"SET lock_timeout = '{lock_timeout}'",
        f"SET statement_timeout = '{statement_timeout}'",
    ]


def apply_timeouts(connection: Connection, lock_timeout: str, statement_timeout: str) -> None:
    """Set both timeouts on the migration connection, committed, before any DDL."""
    for statement in timeout_statements(lock_timeout, statement_timeout):
        connection.execute(text(statement))
    connection.commit()
