"""The one reader of database errors: SQLSTATE and constraint of an error raised by asyncpg or
wrapped by SQLAlchemy, which ones a retry may cure, which say the database cannot serve now.
Used by the retry loop (db/retry.py), the repositories (constraint names), the doors (replica
outages) and service/app/failures.py, which says what each means to a client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, DEADLOCK_DETECTED})
QUERY_CANCELED = "57014"  # query_canceled: statement_timeout or a cancel request
# SQLSTATEs that say "this server cannot serve you now", whichever driver class carries them:
# class 08 (connection exception), 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03
# cannot_connect_now (starting up, shutting down, in recovery), 53300 too_many_connections.
# asyncpg raises 57P03 during a restart, which SQLAlchemy wraps as a plain DBAPIError.
# 25006 read_only_sql_transaction: the server took our write but accepts none any more, a
# primary demoted to a standby in a failover (docs/scale-out.md, "Failover with Patroni").
READ_ONLY_SQL_TRANSACTION = "25006"
UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", READ_ONLY_SQL_TRANSACTION)
# Of those, the ones after which a pooled connection must not serve again: its server is gone
# or shutting down, or is a standby now. (57P03 and 53300 refuse a connection being opened.)
DISCONNECT_SQLSTATES = ("08", "57P01", "57P02", READ_ONLY_SQL_TRANSACTION)


class ConcurrentClaim(Exception):
    """A write meant to insert a unique key (a request_id) that a concurrent transaction
    inserted and committed first: PostgreSQL made it wait for that one, then refused it. The
    transaction did nothing that stays; run again from the start, its reads see the other's
    row (the money writer, repositories/ledger.py). Retried like a serialization failure."""

    sqlstate = "23505"  # unique_violation, as the retry loop's log line reports it

    def __init__(self, constraint: str | None) -> None:
        super().__init__(f"a concurrent transaction inserted the same key first ({constraint})")
        self.constraint_name = constraint


def error_field(exc: BaseException, name: str) -> str | None:
    """A field of a database error (sqlstate, constraint_name): raised by asyncpg itself or
    wrapped by SQLAlchemy, which keeps asyncpg's error as exc.orig or as its cause."""
    for candidate in _driver_errors(exc):
        value = getattr(candidate, name, None)
        if isinstance(value, str) and value:
            return value
    return None


def _driver_errors(exc: BaseException) -> Iterator[BaseException]:
    """exc, the dialect's error SQLAlchemy wrapped in it (exc.orig), and asyncpg's own (that
    error's cause). handle_error listeners see the dialect's error first hand."""
    yield exc
    inner = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if inner is not None and inner is not exc:
        yield inner
    if inner is not None and inner.__cause__ is not None:
        yield inner.__cause__


def sqlstate(exc: BaseException) -> str | None:
    return error_field(exc, "sqlstate")


def violated_constraint(exc: BaseException) -> str | None:
    """The constraint an integrity error broke (repositories name theirs)."""
    return error_field(exc, "constraint_name")


def is_retryable(exc: BaseException) -> bool:
    """A serialization failure, a deadlock or a claim a concurrent transaction made first: the
    transaction did nothing, run it again."""
    return isinstance(exc, ConcurrentClaim) or sqlstate(exc) in RETRYABLE_SQLSTATES


def is_recovery_conflict(exc: BaseException) -> bool:
    """A hot standby cancelled the statement so that its replay could go on (a read routed to
    a replica, db/routing.py): the same SQLSTATE as a serialization failure, its own message."""
    message = error_field(exc, "message") or ""
    return is_retryable(exc) and "conflict with recovery" in message


def is_unavailable(exc: BaseException) -> bool:
    """The database went away or cannot serve now: the client may retry later."""
    if isinstance(exc, sa_exc.DBAPIError) and (
        exc.connection_invalidated
        or isinstance(exc, sa_exc.InterfaceError | sa_exc.OperationalError)
    ):
        return True
    state = sqlstate(exc)
    if state is not None and state.startswith(UNAVAILABLE_SQLSTATES):
        return True
    if any(isinstance(e, asyncpg.TargetServerAttributeNotMatched) for e in _driver_errors(exc)):
        # target_session_attrs=read-write and no host of the URL takes writes right now: in a
        # failover, until Patroni has promoted the standby. (SQLAlchemy calls it InternalError.)
        return True
    return isinstance(exc, ConnectionError | OSError)


def is_disconnect(exc: BaseException) -> bool:
    """The connection that raised exc must not serve again (DISCONNECT_SQLSTATES)."""
    state = sqlstate(exc)
    return state is not None and state.startswith(DISCONNECT_SQLSTATES)


def discard_lost_connections(engine: AsyncEngine) -> None:
    """Tell SQLAlchemy that an error in DISCONNECT_SQLSTATES is a disconnect, which it then
    handles as one: the connection is discarded and the rest of the pool with it (each is
    replaced on its next checkout), so after a failover no call reuses a connection to the old
    primary. Its own test is narrower: asyncpg reports a closed socket, and a demoted
    primary's 25006 comes on a connection that is still open."""

    @event.listens_for(engine.sync_engine, "handle_error")
    def _mark(context: Any) -> None:
        if not context.is_disconnect and is_disconnect(context.original_exception):
            context.is_disconnect = True


def is_pool_exhausted(exc: BaseException) -> bool:
    """No pooled connection came free within SHOP_POOL_TIMEOUT."""
    return isinstance(exc, sa_exc.TimeoutError)


def is_statement_timeout(exc: BaseException) -> bool:
    """The statement was cancelled: statement_timeout (db/deadlines.py sets it from the call's
    deadline) or a cancel request."""
    return sqlstate(exc) == QUERY_CANCELED
