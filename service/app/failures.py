"""What a failure means to a client, whatever the transport: domain errors as they are, and
the data layer's refusals and database errors (classified by service/db/errors.py) as the
domain error a client can act on: UNAVAILABLE or RESOURCE_EXHAUSTED to retry, DEADLINE_EXCEEDED.
The error interceptor answers with it."""

from __future__ import annotations

from service import errors
from service.db.database import StreamSlotsFull
from service.db.deadlines import DeadlinePassed
from service.db.errors import (
    is_pool_exhausted,
    is_recovery_conflict,
    is_retryable,
    is_statement_timeout,
    is_unavailable,
)


def as_domain_error(exc: BaseException) -> errors.DomainError | None:
    """What a failure means to the client: a domain error as it is, a database error as
    service/db/errors.py classifies it; None for one that is a bug (INTERNAL)."""
    if isinstance(exc, errors.DomainError):
        return exc
    if isinstance(exc, DeadlinePassed):
        return errors.DeadlineExceeded("the deadline passed before the database work began")
    if isinstance(exc, StreamSlotsFull):
        return errors.ResourceExhausted(
            f"{exc.limit} streaming calls already hold a database connection on this "
            "server (SHOP_MAX_STREAM_CONNECTIONS); retry shortly",
            reason="TOO_MANY_STREAMS",
            limit=exc.limit,
        )
    if is_recovery_conflict(exc):
        # The read, not the database, was refused: an export resumes from its last token.
        return errors.Unavailable(
            "the read replica cancelled this read to replay the primary's changes; retry or resume",
            reason="REPLICA_CONFLICT",
        )
    if is_retryable(exc):
        # Only when db/retry.py gave up (or could not replay, as for ImportUsers): nothing
        # was applied, so the client may safely send the request again.
        return errors.Unavailable(
            "the database is busy (serialization failure or deadlock); retry later",
            reason="DATABASE_CONTENTION",
        )
    if is_pool_exhausted(exc):
        return errors.Unavailable("no database connection is free; retry later")
    if is_statement_timeout(exc):
        # statement_timeout, which db/deadlines.py sets from the call's deadline.
        return errors.DeadlineExceeded("the deadline passed while the database was working")
    if is_unavailable(exc):
        return errors.Unavailable.database_down()
    return None
