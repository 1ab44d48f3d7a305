"""The one place that reads which constraint an IntegrityError broke."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError


def violated_constraint(exc: IntegrityError) -> str | None:
    """The constraint name from asyncpg's error (SQLAlchemy wraps it in exc.orig)."""
    cause = exc.orig.__cause__ if exc.orig is not None else None
    name = getattr(cause, "constraint_name", None) or getattr(exc.orig, "constraint_name", None)
    return str(name) if name else None
