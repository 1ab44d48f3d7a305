"""WatchChanges at scale and across processes (issue 21, guarantees 5 and 6), against real
`python -m service serve` processes (tests/process.py) or an own_server, over real channels, on
a real PostgreSQL: 1,000 idle watchers from one channel cost under 50 MB of the server's RSS
and no database connection beyond the shared poll, get heartbeats with valid tokens, and all
receive a change exactly once; a token resumes exactly on another server process and after a
shutdown cut (which ends the stream UNAVAILABLE); a watcher of one resource type gets
heartbeats, with an advancing token, while only other types are written.

No timed assertion: every wait is a bound that only tells a hang from a slow machine."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from shop.v1 import change_feed_service_pb2 as cf
from shop.v1 import change_feed_service_pb2_grpc as cf_grpc
from shop.v1 import user_service_pb2 as users_pb
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.changes import MAX_TOKEN_LENGTH
from service.api.paging import PageTokens
from service.app.changes import Position
from service.config import DEV_PAGE_TOKEN_SECRET
from tests.process import service_process
from tests.servers import own_server

try:  # the helper may move out of test_watch.py; take it from wherever it is
    from tests.changes.helpers import Watcher  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from tests.changes.test_watch import Watcher

WATCHERS = 1000
MB = 1024 * 1024
EXTRA_RSS_LIMIT = 50 * MB
ALL_BOUND = 240.0  # bound on the thousand watchers reaching a state together (a hang, not speed)
ONE_BOUND = 30.0  # bound on one watcher's next expected message
USER, ORDER = cf.RESOURCE_TYPE_USER, cf.RESOURCE_TYPE_ORDER
HEARTBEAT, CAUGHT_UP = cf.CHANGE_FEED_EVENT_HEARTBEAT, cf.CHANGE_FEED_EVENT_CAUGHT_UP
CREATED, UPDATED = cf.OPERATION_CREATED, cf.OPERATION_UPDATED
# One serve process takes a thousand streams: past the default 1000 calls (the admission
# budget counts them; grpc.aio's maximum_concurrent_rpcs is the same setting) and past the
# HTTP/2 limit of 100 streams per connection, which would queue the 101st stream of one
# channel in the client. Nothing else caps one caller: SHOP_MAX_STREAM_CONNECTIONS counts
# only calls that hold a connection (exports, a SNAPSHOT start), not a waiting watcher.
MANY = {"SHOP_MAX_CONCURRENT_RPCS": "2000", "SHOP_MAX_STREAMS_PER_CONNECTION": "2000"}

# The server's own sessions that hold a connection busy: running a statement, or inside a
# transaction. The shared poll (one autocommit statement, LIMIT :cap + 1) and the health
# probe's SELECT 1 are the only ones allowed while every watcher idles.
_BUSY = text(
    "SELECT state, query FROM pg_stat_activity "
    "WHERE application_name LIKE :app AND backend_type = 'client backend'"
)


def rss(pid: int) -> int:
    """The process's resident set, in bytes (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _poll_or_probe(state: str, query: str) -> bool:
    """The one shared poll (running, or between its statement and the end of its transaction
    while this process reads the rows: 'idle in transaction' for that moment) or the health
    probe: the sessions a server with watchers holds whatever their number. The poll is told
    from a stream's own read of the log (repositories/changes.py's _NEWER_ALL) by the WAL
    position it takes: both statements have a LIMIT in their subqueries."""
    shared_poll = "pg_current_snapshot() AS snap" in query and "pg_current_wal_lsn()" in query
    probe = query.strip() == "SELECT 1"
    return (shared_poll and state in ("active", "idle in transaction")) or (
        probe and state == "active"
    )


async def busy_sessions(engine: AsyncEngine, pid: int) -> tuple[int, list[tuple[str, str]]]:
    """(the server's open sessions, those busy beyond the shared poll and the health probe)."""
    async with engine.connect() as conn:  # a new connection: pg_stat_activity is per transaction
        rows = (await conn.execute(_BUSY, {"app": f"%/{pid}"})).all()
    busy = [
        (r.state, r.query)
        for r in rows
        if r.state in ("active", "idle in transaction", "idle in transaction (aborted)")
        and not _poll_or_probe(r.state, r.query)
    ]
    return len(rows), busy


async def all_until(
    watchers: Sequence[Watcher], check: Callable[[Watcher], bool], what: str
) -> None:
    """Until every watcher satisfies `check`; fails at once if a stream ends, and after
    ALL_BOUND seconds with how many are missing."""
    missing: list[Watcher] = list(watchers)

    async def wait() -> None:
        nonlocal missing
        while True:
            ended = [w for w in watchers if w.call.done()]
            if ended:
                code = await ended[0].call.code()
                details = await ended[0].call.details()
                raise AssertionError(f"{len(ended)} streams ended before {what}: {code} {details}")
            missing = [w for w in watchers if not check(w)]
            if not missing:
                return
            await asyncio.sleep(0.1)

    try:
        await asyncio.wait_for(wait(), ALL_BOUND)
    except TimeoutError:
        raise AssertionError(
            f"{len(missing)} of {len(watchers)} watchers without {what} after {ALL_BOUND} s"
        ) from None


@asynccontextmanager
async def watchers(
    channel: grpc.aio.Channel, count: int, **fields: Any
) -> AsyncIterator[list[Watcher]]:
    stub = cf_grpc.ChangeFeedServiceStub(channel)
    started = [Watcher(stub, cf.WatchChangesRequest(**fields)) for _ in range(count)]
    try:
        yield started
    finally:
        await asyncio.gather(*(w.close() for w in started))


def watch(channel: grpc.aio.Channel, **fields: Any) -> Watcher:
    return Watcher(cf_grpc.ChangeFeedServiceStub(channel), cf.WatchChangesRequest(**fields))


async def insert_user(engine: AsyncEngine, email: str) -> int:
    async with engine.begin() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "INSERT INTO users (email, first_name, last_name) "
                        "VALUES (:e, 'W', 'W') RETURNING id"
                    ),
                    {"e": email},
                )
            ).scalar_one()
        )


async def insert_order(engine: AsyncEngine, user_id: int) -> int:
    async with engine.begin() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "INSERT INTO orders (user_id, status, total, currency) "
                        "VALUES (:u, 'pending', 0, 'USD') RETURNING id"
                    ),
                    {"u": user_id},
                )
            ).scalar_one()
        )


def emails(watcher: Watcher) -> list[str]:
    return [c.user.email for c in watcher.changes]


def first_response(w: Watcher) -> bool:
    return bool(w.responses)


def heartbeat_after_start(w: Watcher) -> bool:
    return any(r.event == HEARTBEAT for r in w.responses[1:])


async def _started(watcher: Watcher) -> None:
    await watcher.until(lambda w: w.responses, "first response")
    assert watcher.responses[0].event == CAUGHT_UP and watcher.responses[0].resume_token


async def test_a_thousand_idle_watchers_cost_little_memory_no_connection_and_get_heartbeats(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    env = MANY | {"SHOP_CHANGES_HEARTBEAT": "1"}
    with service_process(database_url, tmp_path / "serve.log", **env) as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            # One watcher first, so what every first call loads (imports, the poller, pool
            # connections) is in the baseline rather than counted as the watchers' cost.
            warm = watch(channel, resource_types=[USER])
            await _started(warm)
            await warm.close()
            before = rss(process.pid)
            async with watchers(channel, WATCHERS, resource_types=[USER]) as many:
                await all_until(many, first_response, "a first response")
                after_first = rss(process.pid)
                await all_until(many, heartbeat_after_start, "a heartbeat")
                after_heartbeats = rss(process.pid)
                print(
                    f"serve RSS: {before / MB:.1f} MB before, {after_first / MB:.1f} MB with "
                    f"{WATCHERS} watchers started (+{(after_first - before) / MB:.1f}), "
                    f"{after_heartbeats / MB:.1f} MB after their heartbeats "
                    f"(+{(after_heartbeats - before) / MB:.1f})"
                )
                assert after_first - before < EXTRA_RSS_LIMIT, (before, after_first)
                assert after_heartbeats - before < EXTRA_RSS_LIMIT, (before, after_heartbeats)
                assert all(r.event in (CAUGHT_UP, HEARTBEAT) for w in many for r in w.responses)
                assert not any(w.changes for w in many)

                # The pool stays free: sampled several times while all of them wait.
                for _ in range(5):
                    opened, busy = await busy_sessions(engine, process.pid)
                    assert opened > 0  # the filter names the server's sessions
                    assert busy == [], busy
                    await asyncio.sleep(0.3)

                # A heartbeat's token resumes: right after it, nothing old, the next change.
                tokens = [
                    next(r.resume_token for r in w.responses[1:] if r.event == HEARTBEAT)
                    for w in (many[0], many[WATCHERS // 2], many[-1])
                ]
                resumed = [watch(channel, resource_types=[USER], resume_token=t) for t in tokens]
                try:
                    await insert_user(engine, "one@x.io")
                    await all_until(resumed, lambda w: len(w.changes) >= 1, "the first change")
                    await insert_user(engine, "two@x.io")
                    await all_until(resumed, lambda w: len(w.changes) >= 2, "the second change")
                    for w in resumed:
                        assert emails(w) == ["one@x.io", "two@x.io"]
                        assert [c.sequence for c in w.changes] == [1, 2]
                finally:
                    await asyncio.gather(*(w.close() for w in resumed))


async def test_a_change_reaches_each_of_a_thousand_waiting_watchers_exactly_once(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    with service_process(database_url, tmp_path / "serve.log", **MANY) as (address, process):
        async with (
            grpc.aio.insecure_channel(address) as channel,
            watchers(channel, WATCHERS, resource_types=[USER]) as many,
        ):
            await all_until(many, first_response, "a first response")
            first = await insert_user(engine, "first@x.io")
            await all_until(many, lambda w: len(w.changes) >= 1, "the change")
            # A second change as a barrier: a repeat of the first would come before it.
            await insert_user(engine, "second@x.io")
            await all_until(many, lambda w: len(w.changes) >= 2, "the second change")
            print(f"serve RSS after two changes: {rss(process.pid) / MB:.1f} MB")
            wrong = [
                (i, w.summary())
                for i, w in enumerate(many)
                if emails(w) != ["first@x.io", "second@x.io"]
                or [c.sequence for c in w.changes] != [1, 2]
                or (w.changes[0].operation, w.changes[0].version, w.changes[0].user.id)
                != (CREATED, 1, first)
            ]
            assert wrong == [], f"{len(wrong)} watchers got other changes: {wrong[:3]}"


async def test_a_token_from_one_server_process_resumes_on_another_right_after_it(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    with (
        service_process(database_url, tmp_path / "a.log") as (address_a, _a),
        service_process(database_url, tmp_path / "b.log") as (address_b, _b),
    ):
        async with (
            grpc.aio.insecure_channel(address_a) as channel_a,
            grpc.aio.insecure_channel(address_b) as channel_b,
        ):
            on_a = watch(channel_a, resource_types=[USER], max_batch_size=1)
            try:
                await _started(on_a)
                for n in range(3):
                    await insert_user(engine, f"u{n}@x.io")
                await on_a.until(lambda w: len(w.changes) >= 3, "three changes")
            finally:
                await on_a.close()
            assert emails(on_a)[:3] == ["u0@x.io", "u1@x.io", "u2@x.io"]
            token = next(r.resume_token for r in on_a.responses if r.changes)  # after u0
            for n in range(3, 5):
                await insert_user(engine, f"u{n}@x.io")
            on_b = watch(channel_b, resource_types=[USER], resume_token=token)
            try:
                await on_b.until(lambda w: len(w.changes) >= 4, "four changes")
                await insert_user(engine, "u5@x.io")  # a barrier: nothing more before it
                await on_b.until(lambda w: len(w.changes) >= 5, "the barrier")
            finally:
                await on_b.close()
            assert emails(on_b) == ["u1@x.io", "u2@x.io", "u3@x.io", "u4@x.io", "u5@x.io"]
            assert [c.sequence for c in on_b.changes] == [2, 3, 4, 5, 6]


async def test_a_stream_cut_by_shutdown_ends_unavailable_and_resumes_exactly_on_a_restart(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    with service_process(database_url, tmp_path / "first.log") as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            cut = watch(channel, resource_types=[USER], max_batch_size=1)
            try:
                await _started(cut)
                for n in range(3):
                    await insert_user(engine, f"c{n}@x.io")
                await cut.until(lambda w: len(w.changes) >= 3, "three changes")
                # Two more, and the stop right behind them: they may or may not get out.
                for n in range(3, 5):
                    await insert_user(engine, f"c{n}@x.io")
                process.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(cut.call.code(), ONE_BOUND)
                assert code == grpc.StatusCode.UNAVAILABLE, (code, await cut.call.details())
                await asyncio.to_thread(process.wait, ONE_BOUND)
            finally:
                await cut.close()
    assert process.returncode == 0
    await insert_user(engine, "c5@x.io")  # while no server runs
    before_cut = emails(cut)
    token = cut.responses[-1].resume_token
    with service_process(database_url, tmp_path / "second.log") as (address, _restarted):
        async with grpc.aio.insecure_channel(address) as channel:
            resumed = watch(channel, resource_types=[USER], resume_token=token)
            try:
                await resumed.until(
                    lambda w: len(before_cut) + len(w.changes) >= 6, "the rest of the changes"
                )
                await insert_user(engine, "c6@x.io")  # a barrier: nothing more before it
                await resumed.until(lambda w: len(before_cut) + len(w.changes) >= 7, "the barrier")
            finally:
                await resumed.close()
    everything = before_cut + emails(resumed)
    assert everything == [f"c{n}@x.io" for n in range(7)], (before_cut, emails(resumed))
    sequences = [c.sequence for c in cut.changes + resumed.changes]
    assert sequences == list(range(1, 8))


async def test_heartbeats_come_with_no_writes_and_with_writes_of_other_types_only(
    database_url: str, engine: AsyncEngine
) -> None:
    tokens = PageTokens(DEV_PAGE_TOKEN_SECRET.encode())

    def position(token: str) -> Position:
        fields = tokens.unseal(token, {"watch": [int(ORDER)]}, "resume_token", MAX_TOKEN_LENGTH)
        return Position.from_fields(fields)

    async with own_server(database_url, changes_heartbeat=0.5) as server:
        orders = watch(server.channel, resource_types=[ORDER])
        try:
            await _started(orders)
            # Nothing written: heartbeats, each with a token and no change.
            await orders.until(lambda w: len(w.responses) >= 3, "two heartbeats")
            assert [r.event for r in orders.responses[1:3]] == [HEARTBEAT, HEARTBEAT]
            assert all(r.resume_token and not r.changes for r in orders.responses)

            user = await insert_user(engine, "buyer@x.io")
            first = await insert_order(engine, user)
            await orders.until(lambda w: len(w.changes) >= 1, "the order")
            # Only users written now, in a transaction whose id the tokens must pass.
            async with engine.begin() as conn:
                for n in range(3):
                    await conn.execute(
                        text("UPDATE users SET last_name = :n WHERE id = :id"),
                        {"n": f"L{n}", "id": user},
                    )
                xid = int((await conn.execute(text("SELECT pg_current_xact_id()::text"))).scalar())
            seen = len(orders.responses)

            def past_the_writes(w: Watcher) -> bool:
                return any(
                    r.event == HEARTBEAT and position(r.resume_token).since.sees(xid)
                    for r in w.responses[seen:]
                )

            await orders.until(past_the_writes, "a heartbeat whose token passed the user writes")
            heartbeat = next(
                r
                for r in orders.responses[seen:]
                if r.event == HEARTBEAT and position(r.resume_token).since.sees(xid)
            )
            assert not heartbeat.changes
            assert [(c.order.id, c.operation) for c in orders.changes] == [(first, CREATED)]
            assert position(heartbeat.resume_token).sequence == orders.changes[0].sequence
        finally:
            await orders.close()

        resumed = watch(server.channel, resource_types=[ORDER], resume_token=heartbeat.resume_token)
        try:
            second = await insert_order(engine, user)
            await resumed.until(lambda w: len(w.changes) >= 1, "the next order")
        finally:
            await resumed.close()
        # Nothing old (neither the first order nor any user change): the next order, next.
        assert [(c.order.id, c.operation, c.sequence) for c in resumed.changes] == [
            (second, CREATED, orders.changes[0].sequence + 1)
        ]


BULK_USERS = 200_000
BULK_STATEMENT = 1000  # rows per INSERT: one changes row each
BULK_TRANSACTION = 10  # statements per transaction
SLOW_READER_RSS_LIMIT = 100 * MB


async def test_a_watcher_that_stops_reading_keeps_server_memory_bounded_and_loses_nothing(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """A watcher reads its first response and then nothing while 200,000 users are written in
    bulk (the change log holds them all, about 100 MB as the server's Python objects): the
    server holds back (flow control, a server-side cursor, a bounded poll) instead of buffering
    them, so its RSS grows by less than 100 MB. Then the watcher reads everything, once, in
    order."""
    with service_process(database_url, tmp_path / "serve.log") as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = cf_grpc.ChangeFeedServiceStub(channel)
            request = cf.WatchChangesRequest(resource_types=[USER], max_batch_size=1000)
            call = stub.WatchChanges(request)
            first = await asyncio.wait_for(call.read(), ONE_BOUND)
            assert first.event == CAUGHT_UP
            before = peak = rss(process.pid)
            run = "slow-" + hex(process.pid)
            for start in range(0, BULK_USERS, BULK_STATEMENT * BULK_TRANSACTION):
                async with engine.begin() as conn:
                    for offset in range(
                        start, start + BULK_STATEMENT * BULK_TRANSACTION, BULK_STATEMENT
                    ):
                        await conn.execute(
                            text(
                                "INSERT INTO users (email, first_name, last_name) "
                                "SELECT :run || '-' || g || '@x.io', 'S', 'S' "
                                "FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) g"
                            ),
                            {"run": run, "a": offset, "b": offset + BULK_STATEMENT - 1},
                        )
                peak = max(peak, rss(process.pid))
            for _ in range(20):  # and while the server's polls take the rest in (bounded: 4 s)
                await asyncio.sleep(0.2)
                peak = max(peak, rss(process.pid))
            print(
                f"serve RSS {before / MB:.1f} MB before, peak {peak / MB:.1f} MB while "
                f"{BULK_USERS:,} changes were logged and the watcher read none"
            )
            assert peak - before < SLOW_READER_RSS_LIMIT, (before, peak)

            got: list[cf.Change] = []

            async def read_all() -> None:
                while len(got) < BULK_USERS:
                    response = await call.read()
                    assert response is not grpc.aio.EOF, "the stream ended"
                    got.extend(response.changes)

            await asyncio.wait_for(read_all(), ALL_BOUND)
            call.cancel()
    assert [c.sequence for c in got] == list(range(1, BULK_USERS + 1))
    emails_got = {c.user.email for c in got}
    assert len(emails_got) == BULK_USERS and all(e.startswith(run) for e in emails_got)


async def test_a_write_through_the_server_wakes_its_poll_before_the_interval(
    database_url: str, tmp_path: Path
) -> None:
    """The poll interval is 120 s here; CreateUsers through the same server still reach its
    watcher (each within ONE_BOUND, 30 s): the commit wakes the shared poll. Two of them: the
    first could ride on the poll a new stream starts, the second only on a wake-up."""
    env = {"SHOP_CHANGES_POLL_INTERVAL": "120", "SHOP_CHANGES_HEARTBEAT": "300"}
    with service_process(database_url, tmp_path / "serve.log", **env) as (address, _):
        async with grpc.aio.insecure_channel(address) as channel:
            watcher = watch(channel, resource_types=[USER])
            try:
                await _started(watcher)
                users = user_service_pb2_grpc.UserServiceStub(channel)
                created = []
                for n in (1, 2):
                    request = users_pb.CreateUserRequest(
                        email=f"nudge{n}@x.io", first_name="N", last_name="N"
                    )
                    created.append((await users.CreateUser(request)).id)
                    await watcher.until(
                        lambda w, n=n: len(w.changes) >= n, f"change {n}", ONE_BOUND
                    )
                assert [(c.user.id, c.operation) for c in watcher.changes] == [
                    (user_id, CREATED) for user_id in created
                ]
            finally:
                await watcher.close()
