"""The change log's reads (alembic 0007's triggers write it; app/changes.py says what they mean).

Snapshots travel as pg_snapshot text ('xmin:xmax:xip1,xip2'); xids as bigint (the log stores
pg_current_xact_id() as bigint, so the reads compare plain integers and use ix_changes_xid).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import TextClause, text

from service.db.streaming import Rows, partitions
from service.repositories.handle import Repository

# The transactions a snapshot did not cover are those from its xmax on and those it saw in
# progress; the statement's own snapshot bounds the rest (a transaction it does not see, it
# does not read). One statement: the snapshot it returns is the one its rows were read in.
#
# And those written after the snapshot was taken (:since_taken, the primary's clock) by a
# transaction it counts as finished: after a failover, the new primary hands out again the
# xids of transactions the old one began but whose WAL never reached it (one that rolled back
# just before the crash), and a position taken on the old primary counts them as finished.
# Every transaction it rightly counts as finished wrote before the snapshot, so these are the
# rows below :since_xmax, not in progress then, written later than :since_taken; `boundary` is
# the newest xid below them that wrote earlier (an index scan down from :since_xmax that stops
# at the first such row: in the common case the first it reads), and every row between
# boundary and :since_xmax is a reused xid's. With no time (a position from before times were
# kept) there is nothing between.
_BOUNDARY = """
    CASE WHEN CAST(:since_taken AS timestamptz) IS NULL THEN :since_xmax ELSE COALESCE((
        SELECT b.xid FROM changes b
        WHERE b.xid < :since_xmax AND b.xid <> ALL(CAST(:since_xip AS bigint[]))
          AND b.changed_at <= CAST(:since_taken AS timestamptz)
        ORDER BY b.xid DESC LIMIT 1
    ), 0) END
"""
_NEWER = """
    (c.xid >= :since_xmax OR c.xid = ANY(CAST(:since_xip AS bigint[]))
     OR (c.xid > s.boundary AND c.xid < :since_xmax))
    AND c.resource_type = ANY(CAST(:types AS smallint[]))
"""


# The changes since `since` that the statement's snapshot sees, by id, each with that snapshot
# (and the time just after it was taken: clock_timestamp() runs after the statement's snapshot)
# and how far the log was pruned in it (the first row always: with no change, one row of NULLs
# besides them). One statement, one snapshot: a prune committed meanwhile is either seen in
# `pruned` or not at all in the rows.
def _newer_sql(limit: str, lsn: str, rows: str) -> str:
    # `newer` is MATERIALIZED on purpose: inlined, the planner walked pk_changes in id order
    # (for the ORDER BY and the window) and filtered every row of the log by xid: 40 ms a
    # poll with 300,000 changes rows and nothing new, growing with the log, and it slowed the
    # service's writes in `make bench`. Materialized, the xid conditions are read through
    # ix_changes_xid first; only the rows found are sorted, and a row's contents are read
    # (joined back by id) only for the rows the statement returns.
    return f"""
    WITH s AS MATERIALIZED (
        SELECT pg_current_snapshot() AS snap,
               clock_timestamp() AS taken,
               COALESCE((SELECT through_xid FROM changes_pruned), 0) AS pruned,
               {lsn} AS lsn,
               {_BOUNDARY} AS boundary
    ), newer AS MATERIALIZED (
        SELECT c.id, c.xid, c.resource_type, c.changed_at, c.entries
        FROM s, changes c
        WHERE {_NEWER}
    )
    SELECT s.snap::text AS snapshot, s.taken, s.pruned, s.lsn, c.id, c.xid, c.resource_type,
           c.changed_at, c.entries, {rows} AS rows
    FROM s
    LEFT JOIN LATERAL (
        SELECT n.id, n.xid, n.resource_type, n.changed_at, n.entries,
               sum(n.entries) OVER (ORDER BY n.id) AS running
        FROM (SELECT * FROM newer ORDER BY newer.id {limit}) n
    ) c ON true
    LEFT JOIN changes r ON r.id = c.id
    ORDER BY c.id
    """


# A poll: at most :cap + 1 changes rows, so that the poller can tell "more than it hands out",
# and their contents only while they hold :max_changes changes in all (the rest is NULL, not
# even read from TOAST): what a poll keeps in memory for every stream is bounded by changes,
# not by rows of up to 1000 each. A poll runs on the primary: with the WAL position its
# snapshot is reached at (a replica that has replayed past it sees every transaction the
# snapshot does).
POLL = text(
    _newer_sql(
        "LIMIT :cap + 1",
        "pg_current_wal_lsn()::text",
        "CASE WHEN c.running <= :max_changes THEN r.rows::text END",
    )
)
_NEWER_ALL = _newer_sql("", "NULL::text", "r.rows::text")
_REPLAY = text("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")

_PRUNED = "SELECT COALESCE((SELECT through_xid FROM changes_pruned), 0)"

PRUNE = text(
    """
    WITH oldest AS (
        SELECT max(o.xid) AS through
        FROM (
            SELECT c.xid FROM changes c WHERE c.changed_at < :cutoff ORDER BY c.id LIMIT :batch
        ) o
    ), gone AS (
        DELETE FROM changes c USING oldest WHERE c.xid <= oldest.through RETURNING c.id
    ), moved AS (
        INSERT INTO changes_pruned (one, through_xid)
        SELECT true, oldest.through FROM oldest WHERE oldest.through IS NOT NULL
        ON CONFLICT (one) DO UPDATE
        SET through_xid = GREATEST(changes_pruned.through_xid, EXCLUDED.through_xid)
        RETURNING 1
    )
    SELECT count(*) FROM gone
    """
)

_ITEMS = text(
    """
    SELECT i.order_id, jsonb_agg(to_jsonb(i) ORDER BY i.id)::text
    FROM order_items i
    WHERE i.order_id = ANY(CAST(:ids AS bigint[]))
    GROUP BY i.order_id
    """
)

# Snapshot pages: a resource table's rows after an id, as to_jsonb (what the triggers log).
_TABLES = {1: "users", 2: "orders", 3: "accounts", 4: "transfers"}


def lsn_of(text: str) -> int:
    """A pg_lsn's text ('16/B374D848') as an integer, to compare."""
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def _newer(
    since_xmax: int, since_xip: Sequence[int], since_taken: datetime | None, types: Sequence[int]
) -> dict[str, Any]:
    return {
        "since_xmax": since_xmax,
        "since_xip": list(since_xip),
        "since_taken": since_taken,
        "types": list(types),
    }


class ChangeLog(Repository):
    """Reads of the change log and of the resource tables as the log writes them, on the
    session or connection a door gave."""

    async def poll(
        self,
        since_xmax: int,
        since_xip: Sequence[int],
        since_taken: datetime | None,
        types: Sequence[int],
        cap: int,
        max_changes: int,
    ) -> tuple[str, datetime, int, int, Sequence[Any]]:
        """On the primary: (the statement's snapshot, the time just after it was taken, the WAL
        position then, how far the log was pruned, the changes rows newer than `since` it
        sees, at most cap + 1, by id; `rows` None past the first max_changes changes)."""
        params = _newer(since_xmax, since_xip, since_taken, types)
        params |= {"cap": cap, "max_changes": max_changes}
        rows = (await self.on.execute(POLL, params)).all()
        first = rows[0]
        return (
            first.snapshot,
            first.taken,
            lsn_of(first.lsn),
            first.pruned,
            [r for r in rows if r.id is not None],
        )

    async def replayed(self) -> int | None:
        """On a standby, the WAL position it has replayed to; None on a primary."""
        standby, lsn = (await self.on.execute(_REPLAY)).one()
        return lsn_of(lsn) if standby else None

    async def pruned_through(self) -> int:
        """Every change of a transaction with an xid up to this one has been pruned."""
        pruned = await self.on.execute(text(_PRUNED))
        return int(pruned.scalar_one())

    async def prune(self, cutoff: datetime, batch: int) -> int:
        """Delete up to about `batch` of the oldest changes written before `cutoff`, and with
        them every change of a transaction with an xid no newer than theirs, so that the log
        keeps exactly the transactions after one xid (its pruned_through); the number deleted."""
        return int((await self.on.execute(PRUNE, {"cutoff": cutoff, "batch": batch})).scalar_one())

    async def current_snapshot(self) -> tuple[str, datetime]:
        """The snapshot of the statement, or of the transaction under REPEATABLE READ, and the
        time just after it was taken."""
        query = text("SELECT pg_current_snapshot()::text, clock_timestamp()")
        snapshot, taken = (await self.on.execute(query)).one()
        return str(snapshot), taken

    def newer(
        self,
        since_xmax: int,
        since_xip: Sequence[int],
        since_taken: datetime | None,
        types: Sequence[int],
        batch_size: int,
    ) -> AsyncGenerator[Rows, None]:
        """The changes rows newer than `since` that one statement's snapshot sees, by id, from
        a server-side cursor, batch_size rows at a time; each row carries that snapshot, and
        the first row is there even when there is no change (its id is NULL)."""
        stmt = text(_NEWER_ALL).bindparams(**_newer(since_xmax, since_xip, since_taken, types))
        return partitions(self.on, stmt, batch_size)

    async def items(self, order_ids: Sequence[int]) -> dict[int, str]:
        """Each order's lines as a JSON array of to_jsonb(order_items) rows, by order id."""
        if not order_ids:
            return {}
        rows = await self.on.execute(_ITEMS, {"ids": list(order_ids)})
        return {order_id: items for order_id, items in rows}

    def rows_after(
        self, resource_type: int, after_id: int, batch_size: int
    ) -> AsyncGenerator[Rows, None]:
        """The table's rows with id > after_id as (id, to_jsonb text), by id, batch_size at a
        time: a snapshot's pages, in the transaction's snapshot."""
        table = _TABLES[resource_type]
        stmt: TextClause = text(
            f"SELECT t.id, to_jsonb(t)::text AS row FROM {table} t "
            "WHERE t.id > :after_id ORDER BY t.id"
        ).bindparams(after_id=after_id)
        return partitions(self.on, stmt, batch_size)
