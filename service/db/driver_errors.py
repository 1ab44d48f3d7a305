"""Reading asyncpg's error fields (sqlstate, constraint_name) wherever the error came from."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError


def error_field(exc: BaseException, name: str) -> str | None:
    """The field of a database error: raised by asyncpg itself (work on the driver, as in
    service/db/driver.py) or wrapped by SQLAlchemy, which keeps asyncpg's error as exc.orig or
    as its cause."""
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    for candidate in (exc, orig, orig.__cause__ if orig is not None else None):
        value = getattr(candidate, name, None)
        if isinstance(value, str) and value:
            return value
    return None
