"""Fixtures of the stream, cancellation and deadline tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import event

from service.serving.server import RunningServer


@pytest.fixture
def invalidations(server: RunningServer) -> Iterator[list[BaseException | None]]:
    """Connections the server's pool threw away (SQLAlchemy does so when a query is cut off)."""
    seen: list[BaseException | None] = []

    def record(_dbapi: object, _record: object, exc: BaseException | None) -> None:
        seen.append(exc)

    event.listen(server.engine.sync_engine.pool, "invalidate", record)
    yield seen
    event.remove(server.engine.sync_engine.pool, "invalidate", record)
