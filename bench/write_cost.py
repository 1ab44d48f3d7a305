"""What a transfer writes (issue 22): rows inserted, updated and deleted per table, the index
entries those add, and WAL bytes, as differences of the server's counters around a workload.

- Rows: pg_stat_user_tables (n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del) of the service's
  database. A backend reports its counts when it goes idle, up to 10 s late in PostgreSQL 15, so
  each snapshot first waits that out (SETTLE_SECONDS).
- Index entries: every insert and every update that is not HOT adds one entry to each index of
  its table (a delete adds none); partial indexes counted as if they matched, so an upper bound.
  BRIN indexes are left out: an insert adds no entry to one (at most it widens the summary of
  a range VACUUM has already summarized; a new range at the table's tail is not summarized).
- WAL: pg_stat_wal.wal_bytes, the whole cluster's (anything else writing on the server counts
  too); and, where pg_walinspect is installed, the records of this database alone (those that
  touch its relations, and the commit records of their transactions).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

SETTLE_SECONDS = 11.0

TABLES = """
SELECT s.relname, s.n_tup_ins, s.n_tup_upd, s.n_tup_hot_upd, s.n_tup_del,
       (SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_am am ON am.oid = c.relam
        WHERE i.indrelid = s.relid AND am.amname <> 'brin') AS indexes
FROM pg_stat_user_tables s
"""
WAL = "SELECT pg_current_wal_lsn()::text AS lsn, wal_bytes, wal_records, wal_fpi FROM pg_stat_wal"
# The records of one database's relations (block_ref names them tablespace/database/relfilenode),
# with the commit records of the transactions that wrote them.
WAL_OF_DATABASE = """
WITH r AS (
    SELECT xid, record_length, block_ref
    FROM pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn)
), mine AS (
    SELECT DISTINCT xid FROM r WHERE block_ref LIKE $3 AND xid <> 0
)
SELECT coalesce(sum(record_length), 0) FROM r
WHERE block_ref LIKE $3 OR xid IN (SELECT xid FROM mine)
"""


@dataclass(frozen=True)
class TableCounts:
    inserted: int
    updated: int
    hot_updated: int
    deleted: int
    indexes: int

    @property
    def index_entries(self) -> int:
        return (self.inserted + self.updated - self.hot_updated) * self.indexes


@dataclass(frozen=True)
class Snapshot:
    lsn: str
    wal_bytes: int
    wal_records: int
    wal_fpi: int
    tables: dict[str, TableCounts]


@dataclass(frozen=True)
class Cost:
    """Per transfer, between two snapshots."""

    transfers: int
    rows: dict[str, tuple[float, float, float]]  # table -> inserted, updated, deleted
    index_entries: dict[str, float]
    indexes: dict[str, int]
    wal_bytes: float  # pg_stat_wal, the cluster's
    wal_records: float
    wal_fpi: float
    database_wal_bytes: float | None  # pg_walinspect, this database's

    @property
    def rows_written(self) -> float:
        return sum(sum(r) for r in self.rows.values())

    @property
    def index_entries_written(self) -> float:
        return sum(self.index_entries.values())

    def lines(self) -> list[str]:
        """One line per table that was written, then the totals."""
        out = []
        for table in sorted(self.rows, key=lambda t: -sum(self.rows[t])):
            ins, upd, dele = self.rows[table]
            out.append(
                f"{table}: {ins:.3f} inserted, {upd:.3f} updated, {dele:.3f} deleted, "
                f"{self.index_entries[table]:.3f} index entries ({self.indexes[table]} indexes)"
            )
        database = (
            f", {self.database_wal_bytes:,.0f} of them this database's (pg_walinspect)"
            if self.database_wal_bytes is not None
            else ""
        )
        out.append(
            f"per transfer: {self.rows_written:.2f} rows written, "
            f"{self.index_entries_written:.2f} index entries, {self.wal_bytes:,.0f} WAL bytes "
            f"(pg_stat_wal, {self.wal_records:.2f} records, {self.wal_fpi:.3f} full-page "
            f"images){database}; over {self.transfers:,} transfers"
        )
        return out


async def _snapshot(conn: asyncpg.Connection) -> Snapshot:
    await asyncio.sleep(SETTLE_SECONDS)
    wal = await conn.fetchrow(WAL)
    tables = {
        row["relname"]: TableCounts(
            row["n_tup_ins"],
            row["n_tup_upd"],
            row["n_tup_hot_upd"],
            row["n_tup_del"],
            row["indexes"],
        )
        for row in await conn.fetch(TABLES)
    }
    return Snapshot(wal["lsn"], int(wal["wal_bytes"]), wal["wal_records"], wal["wal_fpi"], tables)


async def _database_wal(
    conn: asyncpg.Connection, before: Snapshot, after: Snapshot
) -> float | None:
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        oid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
        return float(await conn.fetchval(WAL_OF_DATABASE, before.lsn, after.lsn, f"%/{oid}/%"))
    except asyncpg.PostgresError:
        return None  # no pg_walinspect, or the WAL is gone (no slot could hold it)


@contextlib.asynccontextmanager
async def measured(dsn: str) -> AsyncIterator[list[Cost]]:
    """Around a block: what it wrote, per transfer inserted (the list gets one Cost at the
    end). A temporary physical replication slot holds the window's WAL for pg_walinspect; it
    goes with this connection, so a crash leaves none behind."""
    found: list[Cost] = []
    conn = await asyncpg.connect(dsn)
    try:
        # No free slot: the per-database WAL figure may then be missing.
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute(
                "SELECT pg_create_physical_replication_slot($1, true, true)",
                f"shop_bench_{os.getpid()}",
            )
        before = await _snapshot(conn)
        yield found
        after = await _snapshot(conn)
        found.append(await _cost(conn, before, after))
    finally:
        await conn.close()


async def _cost(conn: asyncpg.Connection, before: Snapshot, after: Snapshot) -> Cost:
    """What was written between the snapshots, per transfer inserted."""
    zero = TableCounts(0, 0, 0, 0, 0)
    transfers = after.tables["transfers"].inserted - before.tables["transfers"].inserted
    n = max(transfers, 1)
    rows, entries, indexes = {}, {}, {}
    for table, a in after.tables.items():
        b = before.tables.get(table, zero)
        ins, upd, dele = a.inserted - b.inserted, a.updated - b.updated, a.deleted - b.deleted
        if ins or upd or dele:
            rows[table] = (ins / n, upd / n, dele / n)
            entries[table] = (a.index_entries - b.index_entries) / n
            indexes[table] = a.indexes
    database_wal = await _database_wal(conn, before, after)
    return Cost(
        transfers,
        rows,
        entries,
        indexes,
        (after.wal_bytes - before.wal_bytes) / n,
        (after.wal_records - before.wal_records) / n,
        (after.wal_fpi - before.wal_fpi) / n,
        None if database_wal is None else database_wal / n,
    )
