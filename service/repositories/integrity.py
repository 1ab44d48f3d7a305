"""The one place that reads which constraint an integrity error broke."""

from __future__ import annotations

from service.db.driver_errors import error_field


def violated_constraint(exc: BaseException) -> str | None:
    """The constraint name of an integrity error, raw asyncpg or wrapped by SQLAlchemy."""
    return error_field(exc, "constraint_name")
