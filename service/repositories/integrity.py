"""The one place that reads which constraint an integrity error broke."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError


def violated_constraint(exc: BaseException) -> str | None:
    """The constraint name of an integrity error: asyncpg's own (work on the driver), or
    wrapped by SQLAlchemy in exc.orig (with asyncpg's error as its cause)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    for candidate in (exc, orig, orig.__cause__ if orig is not None else None):
        name = getattr(candidate, "constraint_name", None)
        if name:
            return str(name)
    return None
