"""The change feed (WatchChanges, issue 21) under load: end-to-end latency, catch-up rate, and
the change log's switch for measuring its cost on writes.

- Latency: a writer process sends mixed writes (CreateUser, UpdateUser, Transfer, CreateOrder)
  at a paced rate, open loop, and notes when each write's RPC returned (commit acknowledged)
  with the change it must produce as (resource type, id, version); a watcher process, started
  before it on WatchChanges NOW, notes when each change arrived. Both clocks are
  time.monotonic (CLOCK_MONOTONIC, one clock for every process on the machine).
- Catch-up: a watcher resumes from a token taken before `count` users were inserted by SQL in
  large statements (the triggers log them), and reads until it has them all.
- The log switch: ALTER TABLE ... DISABLE/ENABLE TRIGGER on the *_log_* statement triggers
  only; the *_version row triggers stay on (the version column is part of the row, not of the
  log), so "off" is the same build writing the same rows without the changes rows.

- The relay: the same writes and matching, with the receiver a JetStream subscriber (an ordered
  consumer of the relay's stream) instead of a watcher: a message reaches a consumer only once
  the stream has stored it, so commit -> received bounds commit -> stored from above.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing as mp
import random
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import nats  # the nats extra, in dev: the relay's receiver
from google.protobuf import field_mask_pb2
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from shop.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    change_feed_service_pb2,
    change_feed_service_pb2_grpc,
    order_service_pb2,
    order_service_pb2_grpc,
    resources_pb2,
    user_service_pb2,
    user_service_pb2_grpc,
)

from bench.results import Measurement, percentile

MB = 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MB)]
USER = change_feed_service_pb2.RESOURCE_TYPE_USER
ORDER = change_feed_service_pb2.RESOURCE_TYPE_ORDER
TRANSFER = change_feed_service_pb2.RESOURCE_TYPE_TRANSFER
CAUGHT_UP = change_feed_service_pb2.CHANGE_FEED_EVENT_CAUGHT_UP
# Writes in flight at most, per writer process (one channel): past it the writer is behind its
# pace and says so. The server's HTTP/2 limit per connection (SHOP_MAX_STREAMS_PER_CONNECTION,
# 100) less a margin (a stream the client saw end may not have closed on the server yet):
# with 256, and with 100, a stall made the server refuse streams (REFUSED_STREAM, UNAVAILABLE).
MAX_IN_FLIGHT = 64
# Changes each kind of write produces (a Transfer: the transfer and its two accounts).
CHANGES_PER_WRITE = {"CreateUser": 1, "UpdateUser": 1, "Transfer": 3, "CreateOrder": 1}
# One cycle of the mix: 12 changes in 6 writes, half of them transfers (the cheapest write per
# change: 3 changes, and the money writer commits concurrent ones together), so 1000 changes/s
# is 500 writes/s, well inside what one service process on two cores answers.
MIX = ("CreateUser", "Transfer", "UpdateUser", "Transfer", "CreateOrder", "Transfer")
# After the writer stops, how long the watcher may still take for the last changes.
DRAIN_SECONDS = 5.0
# Time for the writer processes to start (spawn, imports, channel) before the first write.
WRITER_START_SECONDS = 3.0

# (resource type, id, version); version 0: whichever version arrives first (an order's
# version after CreateOrder is the service's business, not the bench's).
Key = tuple[int, int, int]

LOG_TABLES = ("users", "orders", "accounts", "transfers")
LOG_EVENTS = ("insert", "update", "delete")
LOG_TRIGGERS = tuple((t, f"{t}_log_{event}") for t in LOG_TABLES for event in LOG_EVENTS)


# --- The log switch -----------------------------------------------------------------------


async def set_change_log(dsn: str, on: bool) -> None:
    """Turn the change log's statement triggers on or off (the version triggers stay on).
    Bench only: takes each table's SHARE ROW EXCLUSIVE lock, so run it between loads."""
    action = "ENABLE" if on else "DISABLE"
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for table, trigger in LOG_TRIGGERS:
                await conn.execute(f"ALTER TABLE {table} {action} TRIGGER {trigger}")
    finally:
        await conn.close()


@dataclass(frozen=True)
class WriteCounters:
    """WAL position, transfers and changes rows at a moment (to take differences of)."""

    lsn: str
    transfers: int
    changes: int


async def counters(dsn: str) -> WriteCounters:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT pg_current_wal_lsn()::text AS lsn,"
            " (SELECT coalesce(max(id), 0) FROM transfers) AS transfers,"
            " (SELECT coalesce(max(id), 0) FROM changes) AS changes"
        )
        return WriteCounters(row["lsn"], int(row["transfers"]), int(row["changes"]))
    finally:
        await conn.close()


async def per_transfer(dsn: str, before: WriteCounters) -> tuple[float, float, int]:
    """Since `before`: WAL bytes per transfer (the cluster's WAL: anything else writing on
    the same server counts too), changes rows per transfer, and the transfers."""
    after = await counters(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        diff = "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)"
        wal = float(await conn.fetchval(diff, after.lsn, before.lsn))
    finally:
        await conn.close()
    transfers = after.transfers - before.transfers
    if transfers <= 0:
        return 0.0, 0.0, 0
    return wal / transfers, (after.changes - before.changes) / transfers, transfers


# --- End-to-end latency -------------------------------------------------------------------


@dataclass(frozen=True)
class LatencySpec:
    target: str
    rate: float  # changes/s the writes should produce
    seconds: float
    warmup: float
    accounts: list[int]
    order_user_ids: int  # CreateOrder picks users 1..this
    processes: int = 2  # writer processes, each a share of the rate


def _change_key(change: Any) -> tuple[int, int, int]:
    kind = change.WhichOneof("resource")
    return change.resource_type, getattr(change, kind).id if kind else 0, change.version


async def _watch(target: str, ready: Any, stop: Any) -> tuple[dict[Key, float], list[float]]:
    """WatchChanges NOW for every type, until `stop` is set: first arrival of each (type, id,
    version) and of each (type, id) (as version 0), and the arrival of every change."""
    arrived: dict[Key, float] = {}
    times: list[float] = []
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = change_feed_service_pb2_grpc.ChangeFeedServiceStub(channel)
        call = stub.WatchChanges(change_feed_service_pb2.WatchChangesRequest())

        async def read() -> None:
            async for response in call:
                now = time.monotonic()
                if not ready.is_set():
                    ready.set()  # the first response (CAUGHT_UP): the stream's start is fixed
                for change in response.changes:
                    kind, rid, version = _change_key(change)
                    arrived.setdefault((kind, rid, version), now)
                    arrived.setdefault((kind, rid, 0), now)
                    times.append(now)

        reader = asyncio.create_task(read())
        # The parent always sets `stop` (so the thread waiting for it ends).
        stopped = asyncio.create_task(asyncio.to_thread(stop.wait))
        await asyncio.wait([reader, stopped], return_when=asyncio.FIRST_COMPLETED)
        call.cancel()
        reader.cancel()
        await asyncio.gather(reader, stopped, return_exceptions=True)
    return arrived, times


def _watch_main(target: str, ready: Any, stop: Any, out: Any) -> None:
    out.put(asyncio.run(_watch(target, ready, stop)))


async def _relayed(
    url: str, stream: str, ready: Any, stop: Any
) -> tuple[dict[Key, float], list[float]]:
    """As _watch, from the relay's JetStream stream: an ordered consumer of new messages."""
    arrived: dict[Key, float] = {}
    times: list[float] = []
    client = await nats.connect(url)
    try:
        js = client.jetstream()

        async def on_message(message: Any) -> None:
            now = time.monotonic()
            kind, rid, version = _change_key(
                change_feed_service_pb2.Change.FromString(message.data)
            )
            arrived.setdefault((kind, rid, version), now)
            arrived.setdefault((kind, rid, 0), now)
            times.append(now)

        subscription = await js.subscribe(
            "shop.changes.>",
            stream=stream,
            cb=on_message,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )
        ready.set()
        await asyncio.to_thread(stop.wait)
        await subscription.unsubscribe()
    finally:
        await client.close()
    return arrived, times


def _relayed_main(url: str, stream: str, ready: Any, stop: Any, out: Any) -> None:
    out.put(asyncio.run(_relayed(url, stream, ready, stop)))


def relay_receiver(url: str, stream: str) -> Any:
    """A receiver for measure_latency: the relay's stream `stream` on the NATS at `url`."""
    return functools.partial(_relayed_main, url, stream)


async def wait_for_stream(url: str, stream: str, within: float) -> None:
    """Until the relay has created its stream (it leads and publishes), at most `within` s."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        deadline = time.monotonic() + within
        while True:
            try:
                await js.stream_info(stream)
                return
            except NotFoundError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the relay created no stream {stream} in {within:g} s"
                    ) from None
                await asyncio.sleep(0.2)
    finally:
        await client.close()


async def delete_stream(url: str, stream: str) -> None:
    client = await nats.connect(url)
    try:
        await client.jetstream().delete_stream(stream)
    finally:
        await client.close()


class _Writer:
    """Paced mixed writes; each acknowledged write noted as (key, sent, acknowledged)."""

    def __init__(self, channel: grpc.aio.Channel, spec: LatencySpec, client: int) -> None:
        self.users = user_service_pb2_grpc.UserServiceStub(channel)
        self.orders = order_service_pb2_grpc.OrderServiceStub(channel)
        self.money = account_service_pb2_grpc.AccountServiceStub(channel)
        self.spec = spec
        self.rng = random.Random(client)
        self.run = uuid.uuid4().hex[:8]
        self.n = 0
        self.idle: deque[tuple[int, int]] = deque()  # (user id, its version), no write in flight
        self.acked: list[tuple[Key, float, float]] = []
        self.errors: dict[str, int] = {}
        self.late = 0  # writes not sent on time: MAX_IN_FLIGHT were outstanding

    async def one(self, kind: str) -> None:
        self.n += 1
        n = self.n
        sent = time.monotonic()
        try:
            key = await self._send(kind, n)
        except grpc.aio.AioRpcError as exc:
            name = f"{kind}:{exc.code().name}"
            self.errors[name] = self.errors.get(name, 0) + 1
            return
        self.acked.append((key, sent, time.monotonic()))

    async def _send(self, kind: str, n: int) -> Key:
        if kind == "UpdateUser" and self.idle:
            user_id, version = self.idle.popleft()
            user = resources_pb2.User(id=user_id, last_name=f"Updated{n}")
            mask = field_mask_pb2.FieldMask(paths=["last_name"])
            request = user_service_pb2.UpdateUserRequest(user=user, update_mask=mask)
            await self.users.UpdateUser(request)
            self.idle.append((user_id, version + 1))
            return USER, user_id, version + 1
        if kind in ("CreateUser", "UpdateUser"):  # an update with no user free: a create
            created = await self.users.CreateUser(
                user_service_pb2.CreateUserRequest(
                    email=f"feed-{self.run}-{n}@bench.example", first_name="Feed", last_name=str(n)
                )
            )
            self.idle.append((created.id, 1))
            return USER, created.id, 1
        if kind == "Transfer":
            source, destination = self.rng.sample(self.spec.accounts, 2)
            transfer = await self.money.Transfer(
                account_service_pb2.TransferRequest(
                    from_account_id=source,
                    to_account_id=destination,
                    amount="1.00",
                    request_id=f"feed-{self.run}-{n}",
                )
            )
            return TRANSFER, transfer.id, 1
        order = await self.orders.CreateOrder(
            order_service_pb2.CreateOrderRequest(
                user_id=self.rng.randint(1, self.spec.order_user_ids),
                items=[resources_pb2.OrderItem(sku="FEED-1", quantity=1, unit_price="9.99")],
                request_id=f"feed-{self.run}-{n}",
            )
        )
        return ORDER, order.id, 0


Acked = list[tuple[Key, float, float]]


async def _write(
    spec: LatencySpec, client: int, start: float
) -> tuple[Acked, dict[str, int], int, int]:
    """This client's share of spec.rate changes/s, open loop, from `start` (monotonic) for
    warmup + seconds; returns the acknowledged writes, errors by kind and code, writes sent
    late (MAX_IN_FLIGHT outstanding) and writes sent in the window."""
    per_cycle = sum(CHANGES_PER_WRITE[k] for k in MIX)
    interval = per_cycle * spec.processes / (spec.rate * len(MIX))  # seconds between writes
    async with grpc.aio.insecure_channel(spec.target) as channel:
        await channel.channel_ready()
        writer = _Writer(channel, spec, client)
        tasks: set[asyncio.Task[None]] = set()
        # The clients' sends interleave: each starts a fraction of an interval after the last.
        start += interval * client / spec.processes
        begin, end = start + spec.warmup, start + spec.warmup + spec.seconds
        i = sent = 0
        while (due := start + i * interval) < end:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= MAX_IN_FLIGHT:
                writer.late += 1
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if time.monotonic() >= begin:
                sent += 1
            task = asyncio.create_task(writer.one(MIX[i % len(MIX)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks)
    return writer.acked, writer.errors, writer.late, sent


def _write_main(spec: LatencySpec, client: int, start: float, out: Any) -> None:
    out.put(asyncio.run(_write(spec, client, start)))


@dataclass
class LatencyResult:
    feed: Measurement  # changes/s received, p50/p99 of commit-acknowledged -> received
    writes: Measurement  # changes/s written, p50/p99 of the write RPCs
    missing: int
    matched: int
    refused: int  # writes that failed (not measured)


async def measure_latency(
    spec: LatencySpec,
    receiver: Any = None,
    name: str = "WatchChanges, commit acknowledged -> watcher received",
) -> LatencyResult:
    """A watcher process on WatchChanges NOW (or `receiver`, called as receiver(ready, stop,
    out) in a process of its own), then writer processes at spec.rate changes/s; latency per
    write acknowledged inside the window (after the warm-up)."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    watch_out, write_out = ctx.Queue(), ctx.Queue()
    receive = receiver or functools.partial(_watch_main, spec.target)
    watcher = ctx.Process(target=receive, args=(ready, stop, watch_out), daemon=True)
    watcher.start()
    try:
        if not await asyncio.to_thread(ready.wait, 60):
            raise RuntimeError("the watcher had no first response within 60 s")
        # One clock for all: CLOCK_MONOTONIC is the machine's, so the writers start together.
        start = time.monotonic() + WRITER_START_SECONDS
        begin = start + spec.warmup
        writers = [
            ctx.Process(target=_write_main, args=(spec, i, start, write_out), daemon=True)
            for i in range(spec.processes)
        ]
        for proc in writers:
            proc.start()
        limit = WRITER_START_SECONDS + spec.warmup + spec.seconds + 120
        acked: Acked = []
        errors: Counter[str] = Counter()
        late = sent = 0
        for _ in writers:
            share = await asyncio.to_thread(write_out.get, True, limit)
            acked += share[0]
            errors.update(share[1])
            late += share[2]
            sent += share[3]
        for proc in writers:
            await asyncio.to_thread(proc.join)
        last_ack = max((a for _, _, a in acked), default=begin)
        # Until every write is in, or DRAIN_SECONDS after the last acknowledgement.
        await asyncio.sleep(max(0.0, last_ack + DRAIN_SECONDS - time.monotonic()))
    finally:
        stop.set()
    arrived, times = await asyncio.to_thread(watch_out.get, True, 60)
    await asyncio.to_thread(watcher.join)
    window = [(key, began, ack) for key, began, ack in acked if ack >= begin]
    per_cycle = sum(CHANGES_PER_WRITE[k] for k in MIX)
    latencies, write_latencies, missing, changes = [], [], 0, 0
    for (kind, rid, version), began, ack in window:
        write_latencies.append(ack - began)
        changes += 3 if kind == TRANSFER else 1
        got = arrived.get((kind, rid, version))
        if got is None:
            missing += 1
        else:
            latencies.append(got - ack)
    latencies.sort()
    write_latencies.sort()
    in_window = sum(1 for t in times if begin <= t < begin + spec.seconds)
    feed = Measurement(
        name,
        in_window / spec.seconds,
        "changes/s",
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=missing,
        details=(
            f"{len(latencies):,} writes matched by (type, id, version) over {spec.seconds:g} s "
            f"after {spec.warmup:g} s of warm-up; {len(times):,} changes received in all; "
            f"max {latencies[-1] * 1000 if latencies else 0:.1f} ms"
            + (f"; {missing} never received" if missing else "")
        ),
    )
    error_text = ", ".join(f"{k} x{v}" for k, v in sorted(errors.items()))
    writes = Measurement(
        f"Mixed writes paced at {spec.rate:,.0f} changes/s ({', '.join(dict.fromkeys(MIX))})",
        changes / spec.seconds,
        "changes/s",
        p50_ms=percentile(write_latencies, 0.50) * 1000,
        p99_ms=percentile(write_latencies, 0.99) * 1000,
        # Refused writes are in the details (a count here would hide them in the report).
        details="; ".join(
            filter(
                None,
                [
                    f"{spec.processes} writer processes; {sent / spec.seconds:,.0f} writes/s "
                    f"sent of {spec.rate * len(MIX) / per_cycle:,.0f} paced; {len(window):,} "
                    "acknowledged in the window, p50/p99 per write RPC",
                    f"{late} sent late (>= {MAX_IN_FLIGHT} in flight)" if late else "",
                    f"refused: {error_text}" if error_text else "",
                ],
            )
        ),
    )
    return LatencyResult(feed, writes, missing, len(latencies), sum(errors.values()))


# --- Catch-up -----------------------------------------------------------------------------


async def token_now(target: str) -> str:
    """A resume token for users at the newest commit (the first response of a NOW stream)."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = change_feed_service_pb2_grpc.ChangeFeedServiceStub(channel)
        call = stub.WatchChanges(change_feed_service_pb2.WatchChangesRequest(resource_types=[USER]))
        response = await call.read()
        call.cancel()
        if response is grpc.aio.EOF:
            raise RuntimeError("WatchChanges ended before its first response")
        return str(response.resume_token)


async def vacuum(
    dsn: str, tables: str = "users, orders, order_items, accounts, transfers, changes"
) -> None:
    """VACUUM (ANALYZE) now, in the foreground: what the earlier benchmarks wrote would
    otherwise be vacuumed by autovacuum in the middle of the next point, on the same cores."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"VACUUM (ANALYZE) {tables}")
    finally:
        await conn.close()


async def insert_users(dsn: str, count: int, statement_rows: int) -> float:
    """`count` users by INSERT ... SELECT generate_series, `statement_rows` per statement and
    transaction (the triggers log them, 1000 per changes row); then VACUUM (ANALYZE) of
    users and changes, so neither reader below sets hint bits for the other. Seconds taken
    by the inserts."""
    run = uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        for first in range(0, count, statement_rows):
            last = min(count, first + statement_rows) - 1
            await conn.execute(
                "INSERT INTO users (email, first_name, last_name) "
                "SELECT 'cu-' || $3::text || '-' || g || '@bench.example', 'First' || g, "
                "'Last' || g FROM generate_series($1::bigint, $2::bigint) g",
                first,
                last,
                run,
            )
        elapsed = time.perf_counter() - started
        await conn.execute("VACUUM (ANALYZE) users")
        await conn.execute("VACUUM (ANALYZE) changes")
        return elapsed
    finally:
        await conn.close()


async def _catch_up(target: str, token: str, count: int, batch: int) -> tuple[int, float, float]:
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub = change_feed_service_pb2_grpc.ChangeFeedServiceStub(channel)
        request = change_feed_service_pb2.WatchChangesRequest(
            resource_types=[USER], resume_token=token, max_batch_size=batch
        )
        got = 0
        first = 0.0
        started = time.perf_counter()
        call = stub.WatchChanges(request)
        async for response in call:
            if response.changes and not got:
                first = time.perf_counter() - started
            got += len(response.changes)
            if got >= count and response.event == CAUGHT_UP:
                break
        elapsed = time.perf_counter() - started
        call.cancel()
        return got, first, elapsed


def _catch_up_main(target: str, token: str, count: int, batch: int, out: Any) -> None:
    out.put(asyncio.run(_catch_up(target, token, count, batch)))


async def catch_up(target: str, token: str, count: int, batch: int) -> Measurement:
    """A watcher in its own process resumes from `token` and reads until caught up with
    `count` changes: changes/s."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_catch_up_main, args=(target, token, count, batch, out), daemon=True)
    proc.start()
    got, first, elapsed = await asyncio.to_thread(out.get, True, 1800)
    await asyncio.to_thread(proc.join)
    return Measurement(
        f"WatchChanges catch-up, resumed {count:,} changes behind",
        got / elapsed,
        "changes/s",
        errors=0 if got == count else abs(got - count),
        details=(
            f"{got:,} changes in {elapsed:.2f} s, max_batch_size {batch}, first changes after "
            f"{first * 1000:.1f} ms" + ("" if got == count else f"; expected {count:,}")
        ),
    )
