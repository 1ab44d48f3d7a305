"""The RPC's deadline bounds its database work: each transaction starts with a
statement_timeout equal to the time the call has left, so PostgreSQL itself cancels a query
that would outlive the caller (a lock wait included), and the connection stays usable."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

# Seconds kept back from the statement_timeout (at most a fifth of the time left): PostgreSQL
# cancels first, so the call rolls back and answers DEADLINE_EXCEEDED itself before grpc cancels
# it, which would cost the connection (SQLAlchemy discards a connection interrupted mid-query).
ANSWER_MARGIN = 0.1

# Event-loop time by which the current RPC must be answered; None: the caller set no deadline.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "rpc_deadline", default=None
)


class DeadlinePassed(Exception):
    """The call's deadline passed before its database work began: nothing was applied.
    What that means to a client is service/app/failures.py's to say."""


def bind_deadline(time_remaining: float | None) -> None:
    """Record the current RPC's deadline (grpc's context.time_remaining()) for its unit of work."""
    if time_remaining is None:
        _deadline.set(None)
    else:
        _deadline.set(asyncio.get_running_loop().time() + time_remaining)


def current_deadline() -> float | None:
    """The current RPC's deadline in event-loop time (None: the caller set none)."""
    return _deadline.get()


@contextmanager
def deadline_bound(deadline: float | None) -> Iterator[None]:
    """Bind work done in the block (a batch run for several callers) to `deadline`."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def milliseconds_left() -> int | None:
    """The statement_timeout for work starting now: the time left minus a margin to roll back
    and answer (at least 1 ms), or None without a deadline; raises DeadlinePassed once the
    deadline has passed."""
    deadline = _deadline.get()
    if deadline is None:
        return None
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise DeadlinePassed
    return max(1, int((left - min(ANSWER_MARGIN, left / 5)) * 1000))


def _set_statement_timeout(conn: Connection) -> None:
    # Autocommit work (one statement, no transaction) cannot take SET LOCAL; it is bounded by
    # the call's cancellation instead.
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    ms = milliseconds_left()
    if ms is not None:
        # An int, not a bound parameter: SET takes no parameters.
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")


def bound_by_deadlines(engine: AsyncEngine) -> None:
    """Make every transaction on the engine start with the current RPC's statement_timeout."""
    listener: Any = _set_statement_timeout
    event.listen(engine.sync_engine, "begin", listener)
