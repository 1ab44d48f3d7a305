"""The baselines, measured without the service: an asyncpg server-side cursor, the same export
through SQLAlchemy's stream, the raw upsert statement, raw COPY and pgbench's tpcb-like
transaction. The money writer's batch statements are in bench/batched.py."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.results import Measurement, percentile
from bench.seed import USER_COLUMNS, user_records

# The columns and order StreamUsers sends (service/repositories/users.py export_query).
EXPORT_SQL = (
    "SELECT id, email, first_name, last_name, is_active, created_at, updated_at, deleted_at "
    "FROM users WHERE deleted_at IS NULL ORDER BY id"
)


async def cursor_scan(dsn: str, prefetch: int) -> Measurement:
    """Rows/s of a server-side cursor in a REPEATABLE READ read-only transaction."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = 0
        started = time.perf_counter()
        cpu_started = time.process_time()
        first = 0.0
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            async for _ in conn.cursor(EXPORT_SQL, prefetch=prefetch):
                if not rows:
                    first = time.perf_counter() - started
                rows += 1
        elapsed = time.perf_counter() - started
        cpu_us = (time.process_time() - cpu_started) * 1e6 / max(rows, 1)
    finally:
        await conn.close()
    return Measurement(
        "asyncpg cursor",
        rows / elapsed,
        "rows/s",
        details=(
            f"{rows:,} rows in {elapsed:.2f} s, first row after {first * 1000:.1f} ms, "
            f"client CPU {cpu_us:.2f} µs per row"
        ),
    )


async def sqlalchemy_stream(url: str, batch_size: int) -> Measurement:
    """Rows/s of the same export through SQLAlchemy Core: AsyncConnection.stream with
    yield_per and partitions(), in the same kind of transaction. Not a target: it shows what
    reading through SQLAlchemy's result layer would cost, beside the cursor the service uses."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            rows = 0
            started = time.perf_counter()
            cpu_started = time.process_time()
            stmt = text(EXPORT_SQL).execution_options(yield_per=batch_size)
            result = await conn.stream(stmt)
            async for partition in result.partitions():
                rows += len(partition)
            elapsed = time.perf_counter() - started
            cpu_us = (time.process_time() - cpu_started) * 1e6 / max(rows, 1)
            await conn.rollback()
    finally:
        await engine.dispose()
    return Measurement(
        "SQLAlchemy Core stream",
        rows / elapsed,
        "rows/s",
        details=(
            f"{rows:,} rows in {elapsed:.2f} s, yield_per {batch_size}, "
            f"client CPU {cpu_us:.2f} µs per row"
        ),
    )


def upsert_sql(rows: int) -> str:
    """UpsertUsers' statement: one multi-row INSERT … ON CONFLICT (email) DO UPDATE."""
    values = ", ".join(
        f"(${4 * i + 1}, ${4 * i + 2}, ${4 * i + 3}, ${4 * i + 4})" for i in range(rows)
    )
    return (
        f"INSERT INTO users (email, first_name, last_name, is_active) VALUES {values} "
        "ON CONFLICT (email) DO UPDATE SET first_name = excluded.first_name, "
        "last_name = excluded.last_name, is_active = excluded.is_active, updated_at = now() "
        "WHERE users.deleted_at IS NULL RETURNING xmax = 0"
    )


async def raw_upsert(dsn: str, batches: int, batch_size: int) -> Measurement:
    """Rows/s of the upsert statement, one batch per transaction, sorted by email."""
    conn = await asyncpg.connect(dsn)
    sql = upsert_sql(batch_size)
    try:
        started = time.perf_counter()
        for b in range(batches):
            rows = sorted(user_records("rawup", batch_size, b * batch_size))
            args = [v for email, first, last in rows for v in (email, first, last, True)]
            async with conn.transaction():
                await conn.fetch(sql, *args)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    total = batches * batch_size
    return Measurement(
        "asyncpg INSERT … ON CONFLICT",
        total / elapsed,
        "rows/s",
        details=f"{batches} x {batch_size} rows",
    )


async def raw_copy(dsn: str, calls: int, rows_per_call: int) -> Measurement:
    """Rows/s of copy_records_to_table straight into users, one transaction per call."""
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        for c in range(calls):
            records = user_records("rawcopy", rows_per_call, c * rows_per_call)
            async with conn.transaction():
                await conn.copy_records_to_table("users", records=records, columns=USER_COLUMNS)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return Measurement(
        "asyncpg copy_records_to_table",
        calls * rows_per_call / elapsed,
        "rows/s",
        details=f"{calls} x {rows_per_call:,} rows",
    )


async def _run(*argv: str, cwd: str | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n{text}")
    return text


def _pgbench_latencies(log_dir: Path) -> list[float]:
    """Sorted seconds from pgbench -l logs: client_id tx_no latency_us script_no epoch epoch_us."""
    return sorted(
        int(line.split()[2]) / 1e6
        for log in log_dir.glob("tx*")
        for line in log.read_text().splitlines()
    )


async def pgbench_init(pgbench: str, dsn: str, scale: int) -> None:
    # G: generate the rows server-side, much faster than streaming them from the client.
    await _run(pgbench, "-i", "-q", "-I", "dtGvp", "-s", str(scale), dsn)


async def pgbench_tpcb(pgbench: str, dsn: str, clients: int, seconds: int) -> Measurement:
    """tps and per-transaction latency of `pgbench -b tpcb-like -M prepared`."""
    with tempfile.TemporaryDirectory(prefix="shop-bench-pgbench-") as tmp:
        argv = [pgbench, "-b", "tpcb-like", "-M", "prepared", "-c", str(clients), "-j", "2"]
        argv += ["-T", str(seconds), "-n", "-l", "--log-prefix", f"{tmp}/tx", dsn]
        text = await _run(*argv, cwd=tmp)
        latencies = await asyncio.to_thread(_pgbench_latencies, Path(tmp))
    match = re.search(r"tps = ([\d.]+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    return Measurement(
        "pgbench tpcb-like",
        float(match.group(1)) if match else 0.0,
        "tps",
        in_flight=clients,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=int(failed.group(1)) if failed else 0,
        details=" ".join(argv[1:11]),
    )
