"""Retries for the write doors: a serialization failure or a deadlock rolls the whole transaction
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

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.errors import is_retryable, sqlstate
from service.db.transaction import transaction

log = logging.getLogger(__name__)

T = TypeVar("T")


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


async def transactional(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> T:
    """Run `work` in a fresh session and transaction, committed at the end; run it again from
    scratch on a serialization failure or deadlock. When every attempt fails, the last error
    propagates (the error interceptor answers UNAVAILABLE: nothing was applied)."""

    async def attempt() -> T:
        async with transaction(sessions) as session:
            return await work(session)

    return await retried(attempt, policy=policy)


async def retried(
    attempt: Callable[[], Awaitable[T]], *, policy: RetryPolicy = DEFAULT_POLICY
) -> T:
    """Run `attempt` (a whole transaction) again from scratch on a serialization failure or
    deadlock, at most policy.attempts times in all."""
    for number in range(1, policy.attempts + 1):
        try:
            return await attempt()
        except Exception as exc:
            if not is_retryable(exc) or number == policy.attempts:
                raise
            log.info(
                "retrying the transaction after SQLSTATE %s (attempt %d of %d)",
                sqlstate(exc),
                number,
                policy.attempts,
                extra={"sqlstate": sqlstate(exc), "attempt": number},
            )
            await asyncio.sleep(policy.delay(number))
    raise AssertionError("unreachable: the last attempt returns or raises")
