"""How much work each benchmark does: the full run (`make bench`) and `--quick`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    stream_rows: int = 1_000_000
    # Rows per StreamUsers message and per asyncpg cursor prefetch.
    stream_batch: int = 1000
    point_seconds: float = 8.0
    warmup_seconds: float = 1.0
    in_flight: tuple[int, ...] = (1, 16, 64)
    client_processes: int = 2
    transfer_accounts: int = 1000
    hot_accounts: int = 10
    transfer_clients: int = 16
    # BatchTransfer: transfers per call, and calls in flight.
    batch_transfers: int = 1000
    batch_in_flight: int = 4
    # The writer's batch statements on one connection, at these batch sizes, for this long.
    alchemy_batch_sizes: tuple[int, ...] = (1, 16, 64, 1000)
    asyncpg_batch_sizes: tuple[int, ...] = (16, 1000)
    batch_seconds: float = 3.0
    # 16 branches for 16 clients: pgbench at low contention, as issue 3's target assumes.
    pgbench_scale: int = 16
    upsert_batches: int = 60
    upsert_batch: int = 1000
    import_calls: int = 4
    import_rows: int = 50_000
    import_message_rows: int = 1000
    # One ImportUsers into a new database, then StreamUsers' first batch at once.
    fresh_import_rows: int = 1_000_000
    # The change feed (issue 21): mixed writes at this many changes/s for point_seconds while a
    # watcher follows; a watcher resuming this many changes behind (users inserted by SQL,
    # this many per statement); the log on/off write-cost pairs, this many rounds.
    feed_rate: float = 1000.0
    feed_seconds: float = 10.0
    feed_catch_up: int = 1_000_000
    feed_statement_rows: int = 100_000
    feed_cost_rounds: int = 2


FULL = Sizes()
QUICK = Sizes(
    stream_rows=50_000,
    point_seconds=1.5,
    warmup_seconds=0.5,
    transfer_accounts=100,
    pgbench_scale=2,
    upsert_batches=5,
    import_calls=2,
    import_rows=10_000,
    batch_transfers=200,
    batch_seconds=1.0,
    fresh_import_rows=50_000,
    feed_rate=300.0,
    feed_seconds=2.0,
    feed_catch_up=20_000,
    feed_statement_rows=10_000,
    feed_cost_rounds=1,
)
