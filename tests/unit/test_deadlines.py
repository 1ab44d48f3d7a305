"""Deadline arithmetic and the status a cancelled query maps to (no database)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from service import errors
from service.api.interceptors.errors import as_domain_error
from service.db import deadlines


async def test_no_deadline_means_no_statement_timeout() -> None:
    deadlines.bind_deadline(None)
    assert deadlines.milliseconds_left() is None


async def test_the_timeout_keeps_a_margin_to_answer() -> None:
    deadlines.bind_deadline(2.0)
    ms = deadlines.milliseconds_left()
    assert ms is not None
    assert (
        2000 - 1000 * deadlines.ANSWER_MARGIN - 100 <= ms <= 2000 - 1000 * deadlines.ANSWER_MARGIN
    )
    deadlines.bind_deadline(0.01)  # short deadlines keep four fifths of what is left
    short = deadlines.milliseconds_left()
    assert short is not None and 1 <= short <= 8


async def test_a_passed_deadline_refuses_to_start_work() -> None:
    deadlines.bind_deadline(-0.001)
    with pytest.raises(deadlines.DeadlinePassed) as refused:
        deadlines.milliseconds_left()
    # What it means to the client is the application's to say.
    error = as_domain_error(refused.value)
    assert isinstance(error, errors.DeadlineExceeded)
    assert error.reason == "DEADLINE_EXCEEDED"


def test_a_cancelled_query_is_deadline_exceeded_not_unavailable() -> None:
    class Cancelled(Exception):
        sqlstate = asyncpg.exceptions.QueryCanceledError.sqlstate

    wrapped = sa_exc.DBAPIError("SELECT 1", None, Cancelled("canceling statement due to timeout"))
    error = as_domain_error(wrapped)
    assert isinstance(error, errors.DeadlineExceeded)
    assert error.reason == "DEADLINE_EXCEEDED"
