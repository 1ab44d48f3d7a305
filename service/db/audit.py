"""Audit hook: every ORM flush of an audited model (``__audited__ = True``) writes audit_log rows
in the same transaction. Bulk Core statements (upserts, COPY, the money writer's batches) bypass
the ORM and write none here: the change log (alembic 0007) records what every path writes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, insert, inspect
from sqlalchemy.orm import Session, UOWTransaction

from service.db.models import AuditLog


def _changes(obj: Any) -> dict[str, str | None]:
    state = inspect(obj)
    changed: dict[str, str | None] = {}
    for attr in state.mapper.column_attrs:
        history = state.attrs[attr.key].history
        if history.added:
            value = history.added[0]
            changed[attr.key] = None if value is None else str(value)
    return changed


def _action(obj: Any, is_new: bool, changes: dict[str, str | None]) -> str:
    if is_new:
        return "insert"
    if "deleted_at" in changes:
        return "delete" if changes["deleted_at"] is not None else "undelete"
    return "update"


@event.listens_for(Session, "after_flush")
def _write_audit_rows(session: Session, _flush: UOWTransaction) -> None:
    rows = []
    for is_new, objs in ((True, session.new), (False, session.dirty)):
        for obj in objs:
            if not getattr(obj, "__audited__", False):
                continue
            changes = _changes(obj)
            if not changes:
                continue
            rows.append(
                {
                    "table_name": obj.__tablename__,
                    "row_id": obj.id,
                    "action": _action(obj, is_new, changes),
                    "changes": changes,
                }
            )
    if rows:
        session.connection().execute(insert(AuditLog), rows)
