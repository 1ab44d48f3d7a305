"""WatchChanges with a read replica: a stream behind reads the log on the standby, with the
primary's snapshots (a standby's own pg_current_snapshot() lists no transaction in progress
on the primary), and so misses no transaction that was open on the primary when it read."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc

from tests.changes.helpers import Watcher
from tests.process import Served
from tests.replicas.conftest import Databases

WAIT = 20.0
USER = cf.RESOURCE_TYPE_USER


async def _log_scans(replica: asyncpg.Connection) -> int:
    """Scans of the change log counted by the standby itself."""
    scans = await replica.fetchval(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables "
        "WHERE relname = 'changes'"
    )
    return int(scans or 0)


async def _insert(conn: asyncpg.Connection, email: str) -> None:
    await conn.execute(
        "INSERT INTO users (email, first_name, last_name) VALUES ($1, 'R', 'R')", email
    )


async def test_a_stream_reading_the_standby_misses_no_transaction_open_on_the_primary(
    databases: Databases, served: Served
) -> None:
    stub = cf_grpc.ChangeFeedServiceStub(served.channel)
    start = Watcher(stub, cf.WatchChangesRequest(resource_types=[USER]))
    try:
        await start.until(lambda w: w.responses, "the first response")
        token = start.responses[0].resume_token
    finally:
        await start.close()

    primary, open_tx, replica = (
        await databases.primary(),
        await databases.primary(),
        await databases.replica(),
    )
    resumed: Watcher | None = None
    try:
        await open_tx.execute("BEGIN")
        await _insert(open_tx, "early@example.com")  # its xid is taken, and it stays open
        await _insert(primary, "late@example.com")  # committed while `early` is open
        await databases.replica_caught_up()
        scans_before = await _log_scans(replica)

        # Behind from its token, the stream reads the log itself, on the standby.
        resumed = Watcher(stub, cf.WatchChangesRequest(resource_types=[USER], resume_token=token))
        await resumed.until(lambda w: len(w.changes) >= 1, "late's change")
        await open_tx.execute("COMMIT")
        await resumed.until(lambda w: len(w.changes) >= 2, "early's change, once it commits")
        await _insert(primary, "barrier@example.com")
        await resumed.until(lambda w: len(w.changes) >= 3, "the barrier")
        emails = [c.user.email for c in resumed.changes]
        assert emails == ["late@example.com", "early@example.com", "barrier@example.com"]
        assert [c.sequence for c in resumed.changes] == [1, 2, 3]

        # The standby's own statistics show the log read there (flushed within a second or so).
        deadline = time.monotonic() + WAIT
        while await _log_scans(replica) <= scans_before:
            assert time.monotonic() < deadline, "the standby never read the change log"
            await asyncio.sleep(0.2)
    finally:
        if resumed is not None:
            await resumed.close()
        for conn in (primary, open_tx, replica):
            await conn.close()
