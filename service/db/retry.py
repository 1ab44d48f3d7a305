"""The retried unit of work: a serialization failure or a deadlock rolls the whole transaction
back and runs it again (reads included), a bounded number of times, with jittered backoff.

PostgreSQL's advice for 40001 and 40P01 is exactly this: the transaction did nothing, and run
again from the start it may well succeed. Retrying only the failed statement would be wrong, as
the rows it read may have changed."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.transaction import transaction

log = logging.getLogger(__name__)

T = TypeVar("T")

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, DEADLOCK_DETECTED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """At most `attempts` runs; before run n+1 sleep a random time in [0, base * 2**(n-1)],
    capped at `max_delay` ("full jitter": colliding transactions spread out instead of meeting
    again in lockstep)."""

    attempts: int = 5
    base_delay: float = 0.005
    max_delay: float = 0.2

    def delay(self, failed_attempts: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2 ** (failed_attempts - 1))
        return random.uniform(0, ceiling)


DEFAULT_POLICY = RetryPolicy()


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (SQLAlchemy's asyncpg adapter copies it onto exc.orig)."""
    if not isinstance(exc, DBAPIError) or exc.orig is None:
        return None
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig.__cause__, "sqlstate", None)
    return str(code) if code else None


def is_retryable(exc: BaseException) -> bool:
    return sqlstate(exc) in RETRYABLE_SQLSTATES


async def transactional(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> T:
    """Run `work` in a fresh session and transaction, committed at the end; run it again from
    scratch on a serialization failure or deadlock. When every attempt fails, the last error
    propagates (the error interceptor answers UNAVAILABLE: nothing was applied)."""
    for attempt in range(1, policy.attempts + 1):
        try:
            async with transaction(sessions) as session:
                return await work(session)
        except DBAPIError as exc:
            if not is_retryable(exc) or attempt == policy.attempts:
                raise
            log.info(
                "retrying the transaction after SQLSTATE %s (attempt %d of %d)",
                sqlstate(exc),
                attempt,
                policy.attempts,
                extra={"sqlstate": sqlstate(exc), "attempt": attempt},
            )
            await asyncio.sleep(policy.delay(attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")
