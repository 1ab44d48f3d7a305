"""The benchmarks, each a suite that measures the service and its baseline side by side and
returns report sections. `python -m bench --only KEY,...` selects them by key."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg

from bench import baselines, batched, bulk, feed, seed, streaming, write_cost
from bench.load import LoadSpec, run_load
from bench.postgres import Postgres
from bench.processes import ServerProcess, run_migrations
from bench.progress import Progress
from bench.results import Comparison, Measurement, Section
from bench.sizes import Sizes
from service.housekeeping import prune_changes

RSS_LIMIT_MB = 50.0
# Issue 21's change feed: end-to-end latency targets and the anchor they come from.
FEED_P50_MS, FEED_P99_MS = 50.0, 250.0
SEQUIN = "Sequin's published 55 ms average / 253 ms p99 (its own benchmark; not this run)"
FIRST_BATCH_MS = 50.0
# The relay: JetStream holds a change this soon after its commit (p50), on the NATS server the
# machine runs (as CI's does).
RELAY_P50_MS = 100.0
NATS_URL = os.environ.get("SHOP_BENCH_NATS_URL", "nats://127.0.0.1:4222")
# Transfer as docs/benchmarks.md published it at this commit, before group commit (issue 11).
BEFORE = "89b17fe"
BEFORE_TRANSFER = (
    f"Before (docs/benchmarks.md at {BEFORE}, the per-call driver path): Transfer, 1000 "
    "accounts, 16 in flight: 504 transfers/s, 0.18x pgbench tpcb-like (2,862 tps), p50 27.22 ms, "
    "p99 186.71 ms, 1.47 ms of server CPU per transfer. That report has no figure at 1 in "
    "flight, so the p50 at 1 in flight has no published before."
)


# The coalescer that batches each point-read workload's statements (its batcher label).
READ_BATCHERS = {"GetUser": "user read batch", "GetAccount": "account read batch"}


@dataclass
class Run:
    """What every suite needs: sizes, the database, the running service, shared baselines."""

    sizes: Sizes
    postgres: Postgres
    database: str
    service: ServerProcess
    max_user_id: int
    progress: Progress
    echo: dict[int, Measurement] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return self.postgres.dsn(self.database)

    async def load(
        self, server: ServerProcess, workload: str, in_flight: int, name: str, **params: object
    ) -> Measurement:
        """req/s of `workload` against `server`, with the server's CPU time per call."""
        spec = LoadSpec(
            target=server.target,
            workload=workload,
            in_flight=in_flight,
            duration=self.sizes.point_seconds,
            warmup=self.sizes.warmup_seconds,
            processes=self.sizes.client_processes,
            params=params,
        )
        batcher = READ_BATCHERS.get(workload)
        cpu_before = server.cpu_seconds()
        batches_before = await asyncio.to_thread(server.batch_counts, batcher) if batcher else None
        m = await asyncio.to_thread(run_load, spec, name)
        # CPU over warm-up and window alike, over the calls the steady rate gives for both.
        calls = m.value * (spec.warmup + spec.duration)
        if calls > 0:
            m.server_cpu_ms = (server.cpu_seconds() - cpu_before) * 1000 / calls
        if batcher and batches_before:
            await asyncio.sleep(1.5)  # several workers sample their counters once a second
            batches, requests = await asyncio.to_thread(server.batch_counts, batcher)
            ran = batches - batches_before[0]
            if ran > 0:
                mean = (requests - batches_before[1]) / ran
                m.details = ", ".join(
                    filter(
                        None,
                        [m.details, f"{mean:.1f} calls per read batch at {in_flight} in flight"],
                    )
                )
        errors = f", {m.errors} errors ({m.details})" if m.errors else ""
        self.progress(
            "load",
            f"{name} @{in_flight}: {m.value:,.0f} req/s, "
            f"p50 {m.p50_ms:.2f} ms, p99 {m.p99_ms:.2f} ms{errors}",
        )
        return m

    async def echo_baseline(self, levels: tuple[int, ...] = ()) -> dict[int, Measurement]:
        """Echo req/s at each in-flight level (the sizes' levels and `levels`), each measured
        once per run."""
        missing = [n for n in dict.fromkeys((*self.sizes.in_flight, *levels)) if n not in self.echo]
        if missing:
            with ServerProcess.echo() as server:
                await server.wait_ready()
                for n in missing:
                    self.echo[n] = await self.load(server, "echo", n, "echo")
        return self.echo


async def stream(run: Run) -> list[Section]:
    section = Section("stream", f"StreamUsers over {run.sizes.stream_rows:,} rows", issue=11)
    run.progress("stream", "asyncpg cursor")
    cursor = await baselines.cursor_scan(run.dsn, run.sizes.stream_batch)
    run.progress("stream", f"asyncpg cursor: {cursor.value:,.0f} rows/s")
    run.progress("stream", "StreamUsers")
    # The service's first export pays for its connections and first statements; time it,
    # then measure on the warm service as a running one would answer.
    cold, _ = await streaming.first_batch(run.service.target, run.sizes.stream_batch)
    subject, growth, first = await streaming.stream_users(run.service, run.sizes.stream_batch)
    run.progress("stream", f"StreamUsers: {subject.value:,.0f} rows/s, RSS +{growth:.1f} MB")
    run.progress("stream", "SQLAlchemy Core stream")
    url = run.postgres.service_url(run.database)
    core = await baselines.sqlalchemy_stream(url, run.sizes.stream_batch)
    run.progress("stream", f"SQLAlchemy Core stream: {core.value:,.0f} rows/s")
    section.comparisons.append(Comparison(subject, cursor, target=0.7))
    section.comparisons.append(Comparison(core, cursor))
    section.notes.append(
        "The SQLAlchemy Core row reads the same rows through AsyncConnection.stream with "
        "yield_per and partitions(), converting nothing, in this process: the read StreamUsers "
        "is built on, without gRPC and without building the protobuf batches."
    )
    check = f"StreamUsers server RSS growth {growth:.1f} MB (target <= {RSS_LIMIT_MB:g} MB)"
    section.checks.append((check, growth <= RSS_LIMIT_MB))
    check = (
        f"StreamUsers first batch {first * 1000:.1f} ms, table seeded by COPY then VACUUM "
        f"(ANALYZE) (target <= {FIRST_BATCH_MS:g} ms)"
    )
    section.notes.append(
        f"The first StreamUsers the service ever answered (its first export: connections and "
        f"statements not yet warm) had its first batch after {cold * 1000:.1f} ms; the "
        "measured stream and the first-batch check come after it."
    )
    section.checks.append((check, first * 1000 <= FIRST_BATCH_MS))
    return [section]


async def _unary_rows(run: Run, server: ServerProcess, suffix: str) -> list[Comparison]:
    echo = await run.echo_baseline()
    rows = []
    for n in run.sizes.in_flight:
        m = await run.load(server, "GetUser", n, f"GetUser{suffix}", max_id=run.max_user_id)
        rows.append(Comparison(m, echo[n], target=0.6))
    for n in run.sizes.in_flight:
        m = await run.load(server, "CreateUser", n, f"CreateUser{suffix}")
        rows.append(Comparison(m, echo[n]))
    return rows


# Issue 22: the server's CPU per call at most this many times a bare grpc.aio echo's.
CPU_PER_CALL_TARGET = 2.0


def cpu_checks(comparisons: list[Comparison], in_flight: int) -> list[tuple[str, bool | None]]:
    """Issue 22's check of server CPU per call against the echo's, for the rows at
    `in_flight` that have both figures (lower is better, so not a Comparison's ratio)."""
    checks: list[tuple[str, bool | None]] = []
    for c in comparisons:
        mine, echo = c.subject.server_cpu_ms, c.baseline and c.baseline.server_cpu_ms
        if c.subject.in_flight != in_flight or not mine or not echo:
            continue
        times = mine / echo
        checks.append(
            (
                f"{c.subject.name} @{in_flight} server CPU {mine:.3f} ms/call = {times:.2f}x "
                f"echo's {echo:.3f} ms (target <= {CPU_PER_CALL_TARGET:g}x)",
                times <= CPU_PER_CALL_TARGET,
            )
        )
    return checks


def cpu_section(
    key: str, title: str, comparisons: list[Comparison], in_flight: int, how: str
) -> Section:
    """Issue 22's section of CPU-per-call checks for `comparisons` at `in_flight`."""
    section = Section(key, title, issue=22)
    section.checks = cpu_checks(comparisons, in_flight)
    section.notes.append(how)
    return section


async def unary(run: Run) -> list[Section]:
    section = Section("unary", "GetUser and CreateUser beside a bare grpc.aio echo", issue=11)
    section.comparisons = await _unary_rows(run, run.service, "")
    section.notes.append(
        "CreateUser has no target in issue 4; its ratio to echo is shown for information."
    )
    cost = cpu_section(
        "unary-cost",
        "GetUser's server CPU per call beside the echo's",
        [c for c in section.comparisons if c.subject.name == "GetUser"],
        16,
        "CPU time of the server process (its workers included) from /proc over the whole "
        "load, warm-up included, divided by the calls; the echo's the same way, in this run.",
    )
    return [section, cost]


def workers_supported() -> bool:
    from service.config import Settings

    return "workers" in Settings.model_fields


async def workers(run: Run) -> list[Section]:
    section = Section("workers", "GetUser and CreateUser with SHOP_WORKERS=2", issue=4)
    if not workers_supported():
        section.unavailable = "not available (this build's Settings has no `workers` field)"
        run.progress("workers", section.unavailable)
        return [section]
    url = run.postgres.service_url(run.database)
    with ServerProcess.service(url, {"SHOP_WORKERS": "2"}) as server:
        await server.wait_ready()
        # The port answers as soon as one worker listens; give the other time to join.
        await asyncio.sleep(2.0)
        section.comparisons = await _unary_rows(run, server, " (2 workers)")
    section.notes.append(
        "The echo baseline is the same single-process echo server. SHOP_WORKERS defaults to "
        "the usable cores: 2 workers is the default on a 2-core machine."
    )
    cost = cpu_section(
        "workers-cost",
        "GetUser's server CPU per call with 2 workers beside the echo's",
        [c for c in section.comparisons if c.subject.name == "GetUser (2 workers)"],
        16,
        "CPU time of the server and both workers from /proc over the whole load, divided by "
        "the calls; each worker batches its own calls (the calls per read batch above).",
    )
    return [section, cost]


async def _pgbench(run: Run) -> Measurement:
    s = run.sizes
    async with run.postgres.database("pgbench") as name:
        run.progress("transfer", f"pgbench -i -s {s.pgbench_scale}")
        dsn = run.postgres.dsn(name)
        await baselines.pgbench_init(run.postgres.pgbench, dsn, s.pgbench_scale)
        run.progress("transfer", "pgbench tpcb-like")
        seconds = max(1, round(s.point_seconds))
        pgbench = await baselines.pgbench_tpcb(
            run.postgres.pgbench, dsn, s.transfer_clients, seconds
        )
    pgbench.details = f"`pgbench {pgbench.details}` after `pgbench -i -s {s.pgbench_scale}`"
    run.progress("transfer", f"pgbench: {pgbench.value:,.0f} tps")
    return pgbench


async def _last_transfer(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM transfers"))
    finally:
        await conn.close()


async def _per_transaction(dsn: str, after_id: int) -> float | None:
    """Transfers per transaction since `after_id`. A transfer's created_at is now(), its
    transaction's start time, so each distinct value is one of the writer's batches.
    (pg_stat_database's commit count is no use here: an idle backend reports it up to 10 s
    late.)"""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT created_at) FROM transfers WHERE id > $1", after_id
        )
    finally:
        await conn.close()
    return row[0] / row[1] if row[1] else None


async def _money_load(
    run: Run, workload: str, in_flight: int, name: str, per_call: int = 1, **params: object
) -> Measurement:
    """A money workload as transfers/s, with the server's CPU per transfer and the transfers
    per transaction (the writer's mean batch size)."""
    after = await _last_transfer(run.dsn)
    m = await run.load(run.service, workload, in_flight, name, **params)
    per_transaction = await _per_transaction(run.dsn, after)
    m.value *= per_call
    m.unit = "transfers/s"
    if m.server_cpu_ms is not None:
        m.server_cpu_ms /= per_call
    mean = f"{per_transaction:.1f}" if per_transaction else "-"
    m.details = "; ".join(
        filter(None, [m.details, f"{mean} transfers per transaction, {in_flight} in flight"])
    )
    return m


async def _batch_transfer(run: Run, accounts: list[int]) -> Measurement:
    """BatchTransfer calls in flight, as transfers/s and server CPU per transfer."""
    s = run.sizes
    name = f"BatchTransfer, {s.batch_transfers} per call, {len(accounts)} accounts"
    m = await _money_load(
        run,
        "BatchTransfer",
        s.batch_in_flight,
        name,
        per_call=s.batch_transfers,
        accounts=accounts,
        size=s.batch_transfers,
    )
    m.details += "; p50/p99 per call, CPU per transfer"
    run.progress("transfer", f"{name}: {m.value:,.0f} transfers/s")
    return m


async def _batch_statements(run: Run, accounts: list[int]) -> dict[tuple[str, int], Measurement]:
    """The writer's statements on one connection, per runner and batch size."""
    s = run.sizes
    url = run.postgres.service_url(run.database)
    points = [("sqlalchemy", n) for n in s.alchemy_batch_sizes]
    points += [("asyncpg", n) for n in s.asyncpg_batch_sizes]
    found = {}
    for kind, size in points:
        m = await batched.batched_transfers(
            kind, run.dsn, url, accounts, size, s.batch_seconds, s.warmup_seconds
        )
        run.progress("transfer", f"{m.name}: {m.value:,.0f} transfers/s")
        found[kind, size] = m
    return found


async def transfer(run: Run) -> list[Section]:
    s = run.sizes
    section = Section("transfer", "Transfer and BatchTransfer beside pgbench tpcb-like", issue=11)
    run.progress("transfer", f"opening and funding {s.transfer_accounts} accounts via the API")
    user_ids = list(range(1, s.transfer_accounts + 1))
    accounts = await seed.open_funded_accounts(run.service.target, user_ids, "1000000.00")
    pgbench = await _pgbench(run)
    echo = await run.echo_baseline((1, s.transfer_clients))
    spread = await _money_load(
        run,
        "Transfer",
        s.transfer_clients,
        f"Transfer, {len(accounts)} accounts",
        accounts=accounts,
    )
    one = await _money_load(
        run, "Transfer", 1, f"Transfer, {len(accounts)} accounts", accounts=accounts
    )
    hot = await _money_load(
        run,
        "Transfer",
        s.transfer_clients,
        f"Transfer, {s.hot_accounts} hot accounts",
        accounts=accounts[: s.hot_accounts],
    )
    run.progress("transfer", "BatchTransfer with the write counters read around it")
    async with write_cost.measured(run.dsn) as costs:
        batch = await _batch_transfer(run, accounts)
    [written] = costs
    for line in written.lines():
        run.progress("transfer", f"written: {line}")
    run.progress("transfer", "the writer's batch statements on one connection")
    statements = await _batch_statements(run, accounts)
    section.comparisons = [
        Comparison(spread, pgbench, target=0.5),
        Comparison(spread, echo[s.transfer_clients], stretch=0.7),
        Comparison(one, echo[1]),
        Comparison(hot, pgbench),
        Comparison(batch, pgbench, target=5, stretch=10),
        *(Comparison(m, pgbench) for m in statements.values()),
    ]
    raw = statements.get(("asyncpg", s.transfer_clients))
    if raw is not None:
        section.comparisons.append(Comparison(spread, raw))
    raw = statements.get(("asyncpg", s.batch_transfers))
    if raw is not None:
        section.comparisons.append(Comparison(batch, raw))
    section.checks += [
        (f"What the BatchTransfer point wrote (issue 22), {line}", None) for line in written.lines()
    ]
    section.checks.append(
        (
            f"Transfer p50 at 1 in flight: {one.p50_ms or 0:.2f} ms after (p99 "
            f"{one.p99_ms or 0:.2f} ms); before: none published at {BEFORE} (see the notes)",
            None,
        )
    )
    section.notes += [
        BEFORE_TRANSFER,
        "Transfer and BatchTransfer ride one group-commit writer per process: a batch is what "
        "queued while the previous one ran, so one call in flight is a batch of one. The "
        "target applies at low contention (many accounts); the hot-account row shows the cost "
        "of contention and has no target. The stretch row compares with the bare echo's rate "
        "at the same number in flight: the database nearly free.",
        "The batch-statement rows send the writer's statements for a batch (BEGIN, the "
        "SELECT … FOR UPDATE in id order, the idempotency keys read (drawing the transfer "
        "ids), one statement writing balances, journal and the keys with their responses, "
        "COMMIT) from one connection in this process, batches back to back, no gRPC and no "
        "protobuf: on one SQLAlchemy AsyncConnection (`execute(text(...))`, as the writer) and "
        "on raw asyncpg. They place the service between the database's cost per transfer at a "
        "given batch size and pgbench; their CPU column is this process's CPU per transfer.",
    ]
    cost = cpu_section(
        "transfer-cost",
        "Transfer's server CPU per call beside the echo's",
        [Comparison(spread, echo[s.transfer_clients])],
        s.transfer_clients,
        "CPU time of the server process from /proc over the whole load, warm-up included, "
        "divided by the transfers (one per call); the echo's the same way, in this run.",
    )
    return [section, cost]


async def bulk_writes(run: Run) -> list[Section]:
    s = run.sizes
    section = Section("bulk", "Bulk writes: UpsertUsers and ImportUsers", issue=11)
    run.progress("bulk", "raw INSERT … ON CONFLICT")
    raw_upsert = await baselines.raw_upsert(run.dsn, s.upsert_batches, s.upsert_batch)
    run.progress("bulk", f"raw upsert: {raw_upsert.value:,.0f} rows/s; UpsertUsers")
    upsert = await bulk.upsert_users(run.service.target, s.upsert_batches, s.upsert_batch)
    run.progress("bulk", f"UpsertUsers: {upsert.value:,.0f} rows/s; raw COPY")
    raw_copy = await baselines.raw_copy(run.dsn, s.import_calls, s.import_rows)
    run.progress("bulk", f"raw COPY: {raw_copy.value:,.0f} rows/s; ImportUsers")
    imported = await bulk.import_users(
        run.service.target, s.import_calls, s.import_rows, s.import_message_rows
    )
    run.progress("bulk", f"ImportUsers: {imported.value:,.0f} rows/s; half existing")
    mixed = await bulk.import_users(
        run.service.target, s.import_calls, s.import_rows, s.import_message_rows, mixed=True
    )
    run.progress("bulk", f"ImportUsers, half existing: {mixed.value:,.0f} rows/s")
    section.comparisons = [
        Comparison(upsert, raw_upsert, target=0.7),
        Comparison(imported, raw_copy, target=0.8),
        Comparison(mixed, raw_copy, target=0.8),
    ]
    section.notes += [
        "UpsertUsers' target is issue 3's; ImportUsers' is issue 11's (and issue 22's, for the "
        "half-existing mix too).",
        "ImportUsers, half existing: every other row of every message updates a seeded user "
        "(each once), the others are new; judged against the same raw COPY of new rows, as "
        "COPY cannot update.",
    ]
    return [section]


async def _truncate_users(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE users CASCADE")
    finally:
        await conn.close()


async def imported(run: Run) -> list[Section]:
    """A large ImportUsers into a new database, then StreamUsers at once: no VACUUM, no manual
    ANALYZE in between. The same rows by raw COPY into the emptied table are the baseline."""
    s = run.sizes
    rows = s.fresh_import_rows
    title = f"ImportUsers of {rows:,} rows into a new database, then StreamUsers at once"
    section = Section("imported", title, issue=11)
    async with run.postgres.database("imported") as database:
        url = run.postgres.service_url(database)
        run.progress("imported", f"migrating {database}")
        await asyncio.to_thread(run_migrations, url)
        dsn = run.postgres.dsn(database)
        with ServerProcess.service(url) as server:
            await server.wait_ready()
            # Warm the export's path on the empty table, as on a service that has run before.
            cold, _ = await streaming.first_batch(server.target, s.stream_batch)
            run.progress("imported", f"ImportUsers, {rows:,} rows in one call")
            subject = await bulk.import_users(server.target, 1, rows, s.import_message_rows)
            first, got = await streaming.first_batch(server.target, s.stream_batch)
            run.progress(
                "imported",
                f"ImportUsers: {subject.value:,.0f} rows/s; first batch after "
                f"{first * 1000:.1f} ms; raw COPY into the emptied table",
            )
            await _truncate_users(dsn)
            raw = await baselines.raw_copy(dsn, 1, rows)
            raw_first, _ = await streaming.first_batch(server.target, s.stream_batch)
            run.progress(
                "imported",
                f"raw COPY: {raw.value:,.0f} rows/s; StreamUsers first batch after it "
                f"{raw_first * 1000:.1f} ms",
            )
    subject.name = f"ImportUsers, {rows:,} rows, one call"
    raw.name = f"asyncpg copy_records_to_table, {rows:,} rows"
    section.comparisons = [Comparison(subject, raw)]
    check = (
        f"StreamUsers first batch ({got} rows) {first * 1000:.1f} ms straight after the "
        f"ImportUsers, no manual ANALYZE (target <= {FIRST_BATCH_MS:g} ms)"
    )
    section.checks.append((check, first * 1000 <= FIRST_BATCH_MS))
    section.notes += [
        "A new database (migrated, users empty and never analyzed), one ImportUsers call of "
        f"all {rows:,} rows ({s.import_message_rows} per message), then at once a StreamUsers "
        "call timed to its first batch and cancelled. Nothing in between: no VACUUM, no "
        "ANALYZE but the one ImportUsers may run itself. Before the import, one StreamUsers "
        f"on the empty table warmed the service's export path (first answer after "
        f"{cold * 1000:.1f} ms).",
        f"For comparison, not a target: the table emptied (TRUNCATE), the same number of rows "
        f"by raw COPY, and StreamUsers at once again: first batch after "
        f"{raw_first * 1000:.1f} ms with nothing analyzing the table. The ImportUsers row "
        "includes the service's own ANALYZE; the COPY row has none.",
    ]
    return [section]


def _latency_spec(run: Run, target: str, accounts: list[int]) -> feed.LatencySpec:
    """The feed's latency point (and the relay's, the same writes) against `target`."""
    s = run.sizes
    return feed.LatencySpec(
        target=target,
        rate=s.feed_rate,
        seconds=s.feed_seconds if s.feed_seconds else s.point_seconds,
        warmup=s.warmup_seconds,
        accounts=accounts,
        order_user_ids=run.max_user_id,
        processes=s.client_processes,
    )


async def _feed_latency(run: Run, accounts: list[int]) -> Section:
    s = run.sizes
    title = f"WatchChanges end-to-end latency at {s.feed_rate:,.0f} changes/s of mixed writes"
    section = Section("changes-latency", title, issue=21)
    run.progress("changes", f"watcher + writer at {s.feed_rate:,.0f} changes/s")
    result = await feed.measure_latency(_latency_spec(run, run.service.target, accounts))
    m = result.feed
    run.progress(
        "changes",
        f"latency p50 {m.p50_ms or 0:.1f} ms, p99 {m.p99_ms or 0:.1f} ms over {result.matched:,} "
        f"writes; {result.missing} never received; writes {result.writes.value:,.0f} changes/s "
        f"({result.writes.details})",
    )
    # The ratio says whether the watcher kept up with what was written; the targets are the
    # absolute checks below.
    section.comparisons.append(Comparison(m, result.writes))
    p50, p99 = m.p50_ms or 0.0, m.p99_ms or 0.0
    section.checks += [
        (
            f"WatchChanges commit-acknowledged -> received p50 {p50:.1f} ms (target <= "
            f"{FEED_P50_MS:g} ms; anchor: {SEQUIN})",
            p50 <= FEED_P50_MS and result.matched > 0,
        ),
        (
            f"WatchChanges commit-acknowledged -> received p99 {p99:.1f} ms (target <= "
            f"{FEED_P99_MS:g} ms)",
            p99 <= FEED_P99_MS and result.matched > 0,
        ),
        (
            f"Every acknowledged write in the window reached the watcher: {result.missing} missing",
            result.missing == 0,
        ),
        (
            f"Writes refused by the service during the point (not measured): {result.refused}",
            None,
        ),
    ]
    section.notes += [
        "A watcher process opens WatchChanges (START_POSITION_NOW, every type) and, once its "
        "first response came, writer processes (the load generator's number of client "
        "processes, each a share of the rate, started on one clock) send CreateUser, "
        "UpdateUser (of users the same process created, one write in flight per user, so it "
        "knows each version), Transfer and "
        "CreateOrder in a fixed cycle, open loop at the paced rate (12 changes per 6 writes, "
        "half of them transfers: a transfer is 3 changes, itself and its two accounts). "
        "Latency is from the write's RPC returning to the watcher receiving the response "
        "holding that change, matched by "
        "(type, id, version) (an order by its first version), both on CLOCK_MONOTONIC; writes "
        "acknowledged in the warm-up are not counted. A negative latency (change received "
        "before the acknowledgement) counts as it is.",
        "The rate column of the feed row is changes received per second in the window (account "
        "changes included); the baseline row is the changes the acknowledged writes made, with "
        "the write RPCs' own p50/p99: a ratio near 1.00x says the watcher kept up. The service "
        "runs with its default SHOP_CHANGES_POLL_INTERVAL (0.05 s), one shared poll per process, "
        "which a commit through the process wakes sooner (polls at least 10 ms apart). Before "
        "the point, VACUUM (ANALYZE) of the tables the earlier benchmarks wrote, so autovacuum "
        "does not run in the middle of it.",
    ]
    return section


async def _feed_catch_up(run: Run) -> Section:
    s = run.sizes
    count = s.feed_catch_up
    title = f"WatchChanges catch-up, {count:,} changes behind, beside StreamUsers"
    section = Section("changes-catch-up", title, issue=21)
    token = await feed.token_now(run.service.target)
    run.progress("changes", f"inserting {count:,} users by INSERT ... SELECT generate_series")
    seconds = await feed.insert_users(run.dsn, count, s.feed_statement_rows)
    run.progress("changes", f"inserted in {seconds:.1f} s; resuming a watcher {count:,} behind")
    subject = await feed.catch_up(run.service.target, token, count, s.stream_batch)
    run.progress("changes", f"catch-up: {subject.value:,.0f} changes/s; StreamUsers")
    stream, _, _ = await streaming.stream_users(run.service, s.stream_batch)
    run.progress("changes", f"StreamUsers: {stream.value:,.0f} rows/s")
    section.comparisons.append(Comparison(subject, stream, target=0.5))
    section.notes += [
        f"A resume token for users at the newest commit, then {count:,} users inserted by SQL "
        f"(INSERT ... SELECT generate_series, {s.feed_statement_rows:,} rows per statement and "
        "transaction: the triggers log them, 1000 per changes row), then VACUUM (ANALYZE) of "
        "users and changes. A watcher in its own process resumes from the token "
        f"(max_batch_size {s.stream_batch}) and reads until it has them all and is CAUGHT_UP; "
        "then StreamUsers exports the whole users table (the seed and these rows) from "
        "another process, batch_size the same, as in the stream benchmark.",
    ]
    return section


async def _feed_cost_point(
    run: Run, on: bool, accounts: list[int], prefix: str
) -> tuple[Measurement, Measurement, float, float]:
    """BatchTransfer and UpsertUsers with the change log on or off; WAL bytes and changes rows
    per transfer of the BatchTransfer point."""
    s = run.sizes
    label = "log on" if on else "log off"
    await feed.set_change_log(run.dsn, on)
    before = await feed.counters(run.dsn)
    batch = await _batch_transfer(run, accounts)
    wal, logged, _ = await feed.per_transfer(run.dsn, before)
    batch.name += f", {label}"
    batch.details += f"; {wal:,.0f} WAL bytes and {logged:.4f} changes rows per transfer"
    upsert = await bulk.upsert_users(run.service.target, s.upsert_batches, s.upsert_batch, prefix)
    upsert.name += f", {label}"
    run.progress(
        "changes",
        f"{label}: BatchTransfer {batch.value:,.0f} transfers/s ({wal:,.0f} WAL B/transfer), "
        f"UpsertUsers {upsert.value:,.0f} rows/s",
    )
    return batch, upsert, wal, logged


def _mean(found: list[Measurement]) -> Measurement:
    """The rounds' mean rate (and mean p50/p99, CPU), under the first one's name."""
    first = found[0]

    def avg(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    return Measurement(
        first.name,
        sum(m.value for m in found) / len(found),
        first.unit,
        in_flight=first.in_flight,
        p50_ms=avg([m.p50_ms for m in found]),
        p99_ms=avg([m.p99_ms for m in found]),
        errors=sum(m.errors for m in found),
        details="; ".join(dict.fromkeys(m.details for m in found if m.details)),
        server_cpu_ms=avg([m.server_cpu_ms for m in found]),
    )


async def _feed_cost(run: Run, accounts: list[int]) -> Section:
    s = run.sizes
    title = "Cost of the change log on writes: BatchTransfer and UpsertUsers, log on vs off"
    section = Section("changes-cost", title, issue=21)
    points: dict[bool, list[tuple[Measurement, Measurement, float, float]]] = {
        True: [],
        False: [],
    }
    tag = uuid.uuid4().hex[:6]
    try:
        for r in range(s.feed_cost_rounds):
            # Alternated, log on first, so drift in the machine's load hits both alike.
            for on in (True, False):
                prefix = f"cost{tag}{r}{'n' if on else 'f'}"
                points[on].append(await _feed_cost_point(run, on, accounts, prefix))
    finally:
        await feed.set_change_log(run.dsn, True)
    with_log = [_mean([p[i] for p in points[True]]) for i in (0, 1)]
    without = [_mean([p[i] for p in points[False]]) for i in (0, 1)]
    section.comparisons = [
        Comparison(with_log[0], without[0], target=0.85),
        Comparison(with_log[1], without[1], target=0.85),
    ]
    wal_on = sum(p[2] for p in points[True]) / len(points[True])
    wal_off = sum(p[2] for p in points[False]) / len(points[False])
    rows_on = sum(p[3] for p in points[True]) / len(points[True])
    ratio = f" ({wal_on / wal_off:.2f}x)" if wal_off else ""
    section.checks.append(
        (
            f"BatchTransfer WAL per transfer: {wal_on:,.0f} bytes with the log, {wal_off:,.0f} "
            f"without{ratio}; {rows_on * 1000:.1f} changes rows per 1000 transfers with it",
            None,
        )
    )
    section.notes += [
        f"The same build and database, {s.feed_cost_rounds} round(s) of log on then log off, "
        "each row the mean over its rounds. Off is a bench-only switch: ALTER TABLE ... DISABLE "
        "TRIGGER on the 12 statement triggers that write the log (users, orders, accounts, "
        "transfers; *_log_insert/update/delete), re-enabled after. The *_version row triggers "
        "stay on in both: they keep the rows' version column, which is the data, not the log. "
        "BatchTransfer is the transfer benchmark's workload (same accounts, calls in flight, "
        "transfers per call); UpsertUsers is the bulk benchmark's (one call at a time, new "
        "emails, all inserts).",
        "WAL bytes per transfer: pg_current_wal_lsn() before and after the BatchTransfer point "
        "(warm-up included) over the transfers it wrote; the whole server's WAL, so anything "
        "else writing to the same PostgreSQL counts too. Changes rows: max(changes.id) before "
        "and after.",
    ]
    return section


async def _feed_relay(run: Run, accounts: list[int]) -> Section:
    s = run.sizes
    title = (
        f"NATS JetStream relay: commit -> stored in JetStream at {s.feed_rate:,.0f} changes/s "
        "of mixed writes"
    )
    section = Section("changes-relay", title, issue=21)
    url = run.postgres.service_url(run.database)
    stream = f"SHOP_BENCH_{uuid.uuid4().hex[:8].upper()}"
    # A relay that finds its stream empty starts from the oldest change the log keeps: forget
    # the earlier benchmarks' (millions of seeded rows), so it starts at the present.
    await asyncio.sleep(1.0)
    pruned = await prune_changes(url, timedelta(seconds=1))
    run.progress("changes", f"pruned {pruned:,} changes rows; a service with the relay on")
    env = {"SHOP_CHANGES_NATS_URL": NATS_URL, "SHOP_CHANGES_NATS_STREAM": stream}
    with ServerProcess.service(url, env) as server:
        await server.wait_ready()
        await feed.wait_for_stream(NATS_URL, stream, 60.0)
        result = await feed.measure_latency(
            _latency_spec(run, server.target, accounts),
            feed.relay_receiver(NATS_URL, stream),
            name="Relay: commit acknowledged -> JetStream consumer received",
        )
    await feed.delete_stream(NATS_URL, stream)
    m = result.feed
    p50, p99 = m.p50_ms or 0.0, m.p99_ms or 0.0
    run.progress("changes", f"relay p50 {p50:.1f} ms, p99 {p99:.1f} ms; {result.missing} missing")
    section.comparisons.append(Comparison(m, result.writes))
    section.checks += [
        (
            f"Relay commit-acknowledged -> in JetStream p50 {p50:.1f} ms (target <= "
            f"{RELAY_P50_MS:g} ms)",
            p50 <= RELAY_P50_MS and result.matched > 0,
        ),
        (
            f"Every acknowledged write in the window reached JetStream: {result.missing} missing",
            result.missing == 0,
        ),
    ]
    section.notes += [
        "The same writes, pacing and matching as the latency benchmark above, sent to a second "
        "service process started with SHOP_CHANGES_NATS_URL (the relay on: it leads, being the "
        f"only one, and publishes to a stream of its own, {stream}, on {NATS_URL}); the "
        "receiver is an ordered JetStream consumer of new messages in a process of its own. "
        "A consumer receives a message only after the stream stored it, so this figure "
        "bounds commit -> stored from above. The stream is deleted afterwards.",
    ]
    return section


async def change_feed(run: Run) -> list[Section]:
    """Issue 21's figures: latency, catch-up, cost on writes, and the relay's latency."""
    s = run.sizes
    run.progress("changes", f"opening and funding {s.transfer_accounts} accounts via the API")
    user_ids = list(range(1, s.transfer_accounts + 1))
    accounts = await seed.open_funded_accounts(run.service.target, user_ids, "1000000.00")
    run.progress("changes", "VACUUM (ANALYZE) of what the earlier benchmarks wrote")
    await feed.vacuum(run.dsn)
    latency = await _feed_latency(run, accounts)
    catch_up = await _feed_catch_up(run)
    cost = await _feed_cost(run, accounts)
    relay = await _feed_relay(run, accounts)
    return [latency, catch_up, cost, relay]


SUITES: dict[str, Callable[[Run], Awaitable[list[Section]]]] = {
    "stream": stream,
    "unary": unary,
    "workers": workers,
    "transfer": transfer,
    "bulk": bulk_writes,
    "imported": imported,
    "changes": change_feed,
}
