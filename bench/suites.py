"""The benchmarks, each a suite that measures the service and its baseline side by side and
returns report sections. `python -m bench --only KEY,...` selects them by key."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench import baselines, bulk, seed, streaming
from bench.load import LoadSpec, run_load
from bench.postgres import Postgres
from bench.processes import ServerProcess
from bench.progress import Progress
from bench.results import Comparison, Measurement, Section
from bench.sizes import Sizes

RSS_LIMIT_MB = 50.0


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
        cpu_before = server.cpu_seconds()
        m = await asyncio.to_thread(run_load, spec, name)
        # CPU over warm-up and window alike, over the calls the steady rate gives for both.
        calls = m.value * (spec.warmup + spec.duration)
        if calls > 0:
            m.server_cpu_ms = (server.cpu_seconds() - cpu_before) * 1000 / calls
        errors = f", {m.errors} errors ({m.details})" if m.errors else ""
        self.progress(
            "load",
            f"{name} @{in_flight}: {m.value:,.0f} req/s, "
            f"p50 {m.p50_ms:.2f} ms, p99 {m.p99_ms:.2f} ms{errors}",
        )
        return m

    async def echo_baseline(self) -> dict[int, Measurement]:
        """Echo req/s at each in-flight level, measured once per run."""
        if not self.echo:
            with ServerProcess.echo() as server:
                await server.wait_ready()
                for n in self.sizes.in_flight:
                    self.echo[n] = await self.load(server, "echo", n, "echo")
        return self.echo


async def stream(run: Run) -> list[Section]:
    section = Section("stream", f"StreamUsers over {run.sizes.stream_rows:,} rows", issue=4)
    run.progress("stream", "asyncpg cursor")
    cursor = await baselines.cursor_scan(run.dsn, run.sizes.stream_batch)
    run.progress("stream", f"asyncpg cursor: {cursor.value:,.0f} rows/s")
    run.progress("stream", "StreamUsers")
    subject, growth = await streaming.stream_users(run.service, run.sizes.stream_batch)
    run.progress("stream", f"StreamUsers: {subject.value:,.0f} rows/s, RSS +{growth:.1f} MB")
    run.progress("stream", "SQLAlchemy Core stream")
    url = run.postgres.service_url(run.database)
    core = await baselines.sqlalchemy_stream(url, run.sizes.stream_batch)
    run.progress("stream", f"SQLAlchemy Core stream: {core.value:,.0f} rows/s")
    section.comparisons.append(Comparison(subject, cursor, target=0.7))
    section.comparisons.append(Comparison(core, cursor))
    section.notes.append(
        "The SQLAlchemy Core row reads the same rows through AsyncConnection.stream with "
        "yield_per and partitions(), converting nothing: the result layer the exports skip by "
        "reading the cursor's rows from the driver (service/db/streaming.py)."
    )
    check = f"StreamUsers server RSS growth {growth:.1f} MB (target <= {RSS_LIMIT_MB:g} MB)"
    section.checks.append((check, growth <= RSS_LIMIT_MB))
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


async def unary(run: Run) -> list[Section]:
    section = Section("unary", "GetUser and CreateUser beside a bare grpc.aio echo", issue=4)
    section.comparisons = await _unary_rows(run, run.service, "")
    section.notes.append(
        "CreateUser has no target in issue 4; its ratio to echo is shown for information."
    )
    return [section]


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
    section.notes.append("The echo baseline is the same single-process echo server.")
    return [section]


async def transfer(run: Run) -> list[Section]:
    s = run.sizes
    section = Section("transfer", "Transfer beside pgbench tpcb-like", issue=3)
    run.progress("transfer", f"opening and funding {s.transfer_accounts} accounts via the API")
    user_ids = list(range(1, s.transfer_accounts + 1))
    accounts = await seed.open_funded_accounts(run.service.target, user_ids, "1000000.00")
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
    spread = await run.load(
        run.service,
        "Transfer",
        s.transfer_clients,
        f"Transfer, {len(accounts)} accounts",
        accounts=accounts,
    )
    hot = await run.load(
        run.service,
        "Transfer",
        s.transfer_clients,
        f"Transfer, {s.hot_accounts} hot accounts",
        accounts=accounts[: s.hot_accounts],
    )
    for m in (spread, hot):
        m.unit = "transfers/s"
    run.progress("transfer", "the same statements from raw asyncpg")
    raw = await baselines.raw_transfers(
        run.dsn, accounts, s.transfer_clients, s.point_seconds, s.warmup_seconds
    )
    run.progress("transfer", f"raw asyncpg: {raw.value:,.0f} transfers/s")
    section.comparisons = [
        Comparison(spread, pgbench, target=0.5),
        Comparison(hot, pgbench),
        Comparison(raw, pgbench),
        Comparison(spread, raw),
    ]
    section.notes.append(
        "The target applies at low contention (many accounts); the hot-account row shows "
        "the cost of contention and has no target. The raw asyncpg rows place the gap: the "
        "service's own statements for a Transfer (idempotency claim, row locks, posting in a "
        "savepoint, stored response, BEGIN and COMMIT: 8 round trips) sent from one Python "
        "event loop without gRPC, protobuf or SQLAlchemy, beside pgbench and beside the service."
    )
    return [section]


async def bulk_writes(run: Run) -> list[Section]:
    s = run.sizes
    section = Section("bulk", "Bulk writes: UpsertUsers and ImportUsers", issue=3)
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
    run.progress("bulk", f"ImportUsers: {imported.value:,.0f} rows/s")
    section.comparisons = [
        Comparison(upsert, raw_upsert, target=0.7),
        Comparison(imported, raw_copy, target=0.8),
    ]
    return [section]


SUITES: dict[str, Callable[[Run], Awaitable[list[Section]]]] = {
    "stream": stream,
    "unary": unary,
    "workers": workers,
    "transfer": transfer,
    "bulk": bulk_writes,
}
