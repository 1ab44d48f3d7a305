"""Where the RPC being served reads: the primary, or a read replica.

Which RPC reads where is the gRPC room's per-method table (service/api/methods.py); the call-scope
interceptor binds each call's route here, and Database.read() and Database.snapshot() follow it
(service/db/database.py); write(), transaction(), point_reads() and batched() always use the
primary. Outside an RPC (tests, tools) reads go to the primary.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum


class ReadsFrom(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


PRIMARY = ReadsFrom.PRIMARY
REPLICA = ReadsFrom.REPLICA

_reads_from: contextvars.ContextVar[ReadsFrom] = contextvars.ContextVar(
    "reads_from", default=PRIMARY
)


def bind_reads_from(reads_from: ReadsFrom) -> None:
    """Record where the current RPC reads, for its read() and snapshot()."""
    _reads_from.set(reads_from)


def current_reads_from() -> ReadsFrom:
    """Where the current RPC reads (the primary outside an RPC: tests, tools)."""
    return _reads_from.get()


@contextmanager
def reading_from(reads_from: ReadsFrom) -> Iterator[None]:
    """Doors opened in the block read from `reads_from`, whatever the RPC's route (the change
    feed takes its snapshots on the primary and reads rows where the call is routed)."""
    token = _reads_from.set(reads_from)
    try:
        yield
    finally:
        _reads_from.reset(token)
