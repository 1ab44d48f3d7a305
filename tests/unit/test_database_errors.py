"""How service/db/errors.py reads the errors PostgreSQL sends, built the way asyncpg builds them
from the server's fields (PostgresError.new), raw and as SQLAlchemy wraps them. The shapes are
those a hot standby sent in docs/scale-out.md's 1M-row run."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import exc as sa_exc

from service import errors
from service.app.failures import as_domain_error
from service.db.errors import is_recovery_conflict

RECOVERY_CONFLICT = {
    "S": "ERROR",
    "C": "40001",
    "M": "canceling statement due to conflict with recovery",
    "D": "User query might have needed to see row versions that must be removed.",
}
SERIALIZATION_FAILURE = {
    "S": "ERROR",
    "C": "40001",
    "M": "could not serialize access due to concurrent update",
}


def server_error(fields: dict[str, str]) -> BaseException:
    return asyncpg.exceptions.PostgresError.new(fields)  # type: ignore[no-any-return]


def wrapped(error: BaseException) -> sa_exc.DBAPIError:
    """As SQLAlchemy raises it: its adapted error as .orig, asyncpg's as that error's cause."""
    adapted = Exception(str(error))
    adapted.__cause__ = error
    return sa_exc.DBAPIError("SELECT ...", None, adapted)


@pytest.mark.parametrize("shape", [lambda e: e, wrapped], ids=["raw", "wrapped"])
def test_a_standby_cancelling_a_read_is_a_replica_conflict(shape: object) -> None:
    error = shape(server_error(RECOVERY_CONFLICT))  # type: ignore[operator]
    assert is_recovery_conflict(error)
    answer = as_domain_error(error)
    assert isinstance(answer, errors.Unavailable)
    assert answer.reason == "REPLICA_CONFLICT"
    assert "replica" in str(answer)


@pytest.mark.parametrize("shape", [lambda e: e, wrapped], ids=["raw", "wrapped"])
def test_a_serialization_failure_stays_contention(shape: object) -> None:
    error = shape(server_error(SERIALIZATION_FAILURE))  # type: ignore[operator]
    assert not is_recovery_conflict(error)
    answer = as_domain_error(error)
    assert isinstance(answer, errors.Unavailable)
    assert answer.reason == "DATABASE_CONTENTION"
