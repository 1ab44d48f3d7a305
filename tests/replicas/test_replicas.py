"""Read replicas through a real server process and a real streaming standby: the pages and
exports run on the standby (seen in its pg_stat_activity), money reads on the primary; a
replica that lags or stops is skipped, with health SERVING throughout; an export on the standby
keeps its snapshot, resume tokens and clean cancellation, and completes while transfers and
VACUUM run on the primary."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import (
    account_service_pb2_grpc,
    order_service_pb2,
    order_service_pb2_grpc,
    resources_pb2,
    user_service_pb2_grpc,
)
from shop.v1 import user_service_pb2 as users_api

from tests.faults.retry_info import retry_hint
from tests.process import Served
from tests.replicas.conftest import CHECK_INTERVAL, MAX_LAG, Databases, Pair, dsn
from tests.replicas.standby import STANDBY_SETTINGS

T = TypeVar("T")
DEADLINE = 20.0
CANCELLED_EXPORT = 30_000  # users: ~2.2 MB, more than grpc buffers for a reader that stopped
# Long enough for a check to see a lag past MAX_LAG and publish it, with room for a slow CI.
PAST_MAX_LAG = MAX_LAG + 5 * CHECK_INTERVAL + 0.5
SERVICE_BACKENDS = """
    SELECT application_name, state, wait_event_type, query FROM pg_stat_activity
    WHERE application_name LIKE 'shop-service%' AND backend_type = 'client backend'
"""


async def insert_users(databases: Databases, count: int) -> None:
    primary = await databases.primary()
    try:
        await primary.execute(
            "INSERT INTO users (email, first_name, last_name)"
            " SELECT 'u' || n || '@example.com', 'Ada', 'v0' FROM generate_series(1, $1) n",
            count,
        )
    finally:
        await primary.close()


async def backends(server: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await server.fetch(SERVICE_BACKENDS))


async def replica_flush(databases: Databases) -> None:
    """Commit a transaction with an xid on the primary: its commit flushes the WAL before it."""
    primary = await databases.primary()
    try:
        await primary.execute("SELECT pg_current_xact_id()")
    finally:
        await primary.close()


@asynccontextmanager
async def table_locked_on_primary(databases: Databases, table: str) -> AsyncIterator[None]:
    """ACCESS EXCLUSIVE on `table` in an open transaction on the primary; the standby replays
    the lock (its startup process takes it), so a read of the table waits on whichever server
    it was sent to, where pg_stat_activity shows it. Released at the end."""
    primary = await databases.primary()
    replica = await databases.replica()
    try:
        transaction = primary.transaction()
        await transaction.start()
        await primary.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        # The lock's WAL record waits in a partial page; a commit elsewhere flushes it, and the
        # standby receives what is flushed.
        await replica_flush(databases)
        for _ in range(200):
            held = await replica.fetchval(
                "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass"
                " AND mode = 'AccessExclusiveLock'",
                table,
            )
            if held:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"the standby never replayed the lock on {table}")
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await primary.close()
        await replica.close()


async def where_it_waits(
    databases: Databases, table: str, call: Callable[[], Awaitable[T]]
) -> tuple[str, T]:
    """Make `call` while `table` is locked (a function: grpc.aio starts a call when it is
    made, not when awaited); returns ("replica" or "primary", the call's result), where is the
    server whose pg_stat_activity showed the service's read waiting."""
    primary = await databases.primary()
    replica = await databases.replica()
    try:
        async with table_locked_on_primary(databases, table):
            task = asyncio.ensure_future(call())
            where = None
            for _ in range(200):
                for name, server in (("replica", replica), ("primary", primary)):
                    waiting = [
                        b
                        for b in await backends(server)
                        if b["wait_event_type"] == "Lock" and table in b["query"]
                    ]
                    if waiting:
                        where = name
                        if name == "replica":
                            assert waiting[0]["application_name"].startswith(
                                "shop-service-replica/"
                            )
                            assert await server.fetchval("SELECT pg_is_in_recovery()")
                if where is not None:
                    break
                assert not task.done(), f"the call ended without waiting on {table}"
                await asyncio.sleep(0.05)
        assert where is not None, f"no server showed the read of {table} waiting"
        return where, await task
    finally:
        await primary.close()
        await replica.close()


async def drain(stream: grpc.aio.UnaryStreamCall) -> list[int]:  # type: ignore[type-arg]
    """A StreamUsers call's user ids, in the order received."""
    return [user.id async for batch in stream for user in batch.users]


async def messages(stream: grpc.aio.UnaryStreamCall) -> list[object]:  # type: ignore[type-arg]
    return [message async for message in stream]


async def health(served: Served) -> int:
    stub = health_pb2_grpc.HealthStub(served.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
    return int(reply.status)


async def create_user(served: Served) -> int:
    users = user_service_pb2_grpc.UserServiceStub(served.channel)
    user = await users.CreateUser(
        users_api.CreateUserRequest(
            email=f"{uuid.uuid4().hex[:10]}@example.com", first_name="Ada", last_name="Lovelace"
        ),
        timeout=DEADLINE,
    )
    return int(user.id)


async def open_account(served: Served, balance: str) -> int:
    accounts = account_service_pb2_grpc.AccountServiceStub(served.channel)
    account = await accounts.OpenAccount(
        accounts_api.OpenAccountRequest(
            user_id=await create_user(served), currency="EUR", request_id=uuid.uuid4().hex
        ),
        timeout=DEADLINE,
    )
    await accounts.Deposit(
        accounts_api.DepositRequest(
            account_id=account.id, amount=balance, request_id=uuid.uuid4().hex
        ),
        timeout=DEADLINE,
    )
    return int(account.id)


async def test_pages_and_exports_run_on_the_replica(served: Served, databases: Databases) -> None:
    await insert_users(databases, 30)
    account_id = await open_account(served, "10.00")
    await databases.replica_caught_up()
    users = user_service_pb2_grpc.UserServiceStub(served.channel)
    orders = order_service_pb2_grpc.OrderServiceStub(served.channel)
    accounts = account_service_pb2_grpc.AccountServiceStub(served.channel)

    where, page = await where_it_waits(
        databases, "users", lambda: users.ListUsers(users_api.ListUsersRequest(), timeout=DEADLINE)
    )
    assert where == "replica"
    assert len(page.users) == 31
    where, exported = await where_it_waits(
        databases,
        "users",
        lambda: drain(
            users.StreamUsers(users_api.StreamUsersRequest(batch_size=7), timeout=DEADLINE)
        ),
    )
    assert where == "replica"
    assert exported == sorted(exported) and len(set(exported)) == 31
    where, _ = await where_it_waits(
        databases, "orders", lambda: orders.ListOrders(order_service_pb2.ListOrdersRequest())
    )
    assert where == "replica"
    where, _ = await where_it_waits(
        databases,
        "orders",
        lambda: messages(
            orders.StreamOrders(order_service_pb2.StreamOrdersRequest(), timeout=DEADLINE)
        ),
    )
    assert where == "replica"
    where, transfers = await where_it_waits(
        databases,
        "accounts",
        lambda: accounts.ListTransfers(
            accounts_api.ListTransfersRequest(account_id=account_id), timeout=DEADLINE
        ),
    )
    assert where == "replica"
    assert len(transfers.transfers) == 1  # the deposit
    where, _ = await where_it_waits(
        databases,
        "accounts",
        lambda: messages(
            accounts.StreamTransfers(
                accounts_api.StreamTransfersRequest(account_id=account_id), timeout=DEADLINE
            )
        ),
    )
    assert where == "replica"


async def test_get_account_reads_the_primary(served: Served, databases: Databases) -> None:
    account_id = await open_account(served, "10.00")
    accounts = account_service_pb2_grpc.AccountServiceStub(served.channel)
    replica = await databases.replica()
    try:
        await replica.execute("SELECT pg_wal_replay_pause()")  # the replica stops at 10.00
        await accounts.Deposit(
            accounts_api.DepositRequest(
                account_id=account_id, amount="5.00", request_id=uuid.uuid4().hex
            ),
            timeout=DEADLINE,
        )
        account = await accounts.GetAccount(
            accounts_api.GetAccountRequest(id=account_id), timeout=DEADLINE
        )
        assert account.balance == "15.00"
        stale = await replica.fetchval("SELECT balance FROM accounts WHERE id = $1", account_id)
        assert str(stale) == "10.00"
    finally:
        await replica.execute("SELECT pg_wal_replay_resume()")
        await replica.close()


async def test_a_lagging_replica_is_skipped_and_used_again(
    served: Served, databases: Databases
) -> None:
    users = user_service_pb2_grpc.UserServiceStub(served.channel)
    replica = await databases.replica()
    try:
        await replica.execute("SELECT pg_wal_replay_pause()")
        late = await users.CreateUser(
            users_api.CreateUserRequest(
                email="late@example.com", first_name="Late", last_name="Comer"
            ),
            timeout=DEADLINE,
        )
        await asyncio.sleep(PAST_MAX_LAG)
        page = await users.ListUsers(users_api.ListUsersRequest(), timeout=DEADLINE)
        assert late.id in [u.id for u in page.users]  # read on the primary
        assert await health(served) == health_pb2.HealthCheckResponse.SERVING
        assert "skipped" in served.log.read_text()
    finally:
        await replica.execute("SELECT pg_wal_replay_resume()")
        await replica.close()
    await databases.replica_caught_up()
    await asyncio.sleep(PAST_MAX_LAG)
    where, page = await where_it_waits(
        databases, "users", lambda: users.ListUsers(users_api.ListUsersRequest(), timeout=DEADLINE)
    )
    assert where == "replica"
    assert late.id in [u.id for u in page.users]


async def test_a_stopped_replica_is_skipped_and_health_stays_serving(
    served: Served, databases: Databases, pair: Pair
) -> None:
    await insert_users(databases, 10)
    users = user_service_pb2_grpc.UserServiceStub(served.channel)
    await users.ListUsers(users_api.ListUsersRequest(), timeout=DEADLINE)  # a pooled connection
    pair.standby.stop("immediate")
    try:
        # At once (before any check noticed) and after: every call succeeds, on the primary.
        started = time.monotonic()
        while time.monotonic() - started < PAST_MAX_LAG:
            page = await users.ListUsers(users_api.ListUsersRequest(), timeout=DEADLINE)
            assert len(page.users) == 10
            assert await health(served) == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(0.1)
    finally:
        pair.standby.start()
    await databases.replica_caught_up()
    await asyncio.sleep(PAST_MAX_LAG)
    where, _ = await where_it_waits(
        databases, "users", lambda: users.ListUsers(users_api.ListUsersRequest(), timeout=DEADLINE)
    )
    assert where == "replica"  # used again once it answers its checks


async def test_an_export_cut_off_by_its_replica_ends_unavailable_and_resumes(
    served: Served, databases: Databases, pair: Pair
) -> None:
    await insert_users(databases, 20_000)
    await databases.replica_caught_up()
    users = user_service_pb2_grpc.UserServiceStub(served.channel)
    stream = users.StreamUsers(users_api.StreamUsersRequest(batch_size=5), timeout=DEADLINE)
    first = await stream.read()
    # The export's cursor is open on the standby, in its transaction, while the client holds:
    # once the server has read ahead as far as flow control lets it (until then the backend
    # may be 'active' on its next FETCH), it is idle in its transaction.
    replica = await databases.replica()
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            held = [b["state"] for b in await backends(replica) if "FROM users" in b["query"]]
            if held != ["active"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        await replica.close()
    assert held == ["idle in transaction"]
    pair.standby.stop("immediate")
    try:
        seen = [u.id for u in first.users]
        token = first.resume_token
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            while (batch := await stream.read()) is not grpc.aio.EOF:
                seen.extend(u.id for u in batch.users)
                token = batch.resume_token
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        # The retry reads elsewhere (the replica was marked down): the rest, from its token.
        rest = await drain(
            users.StreamUsers(
                users_api.StreamUsersRequest(batch_size=5000, resume_token=token),
                timeout=DEADLINE,
            )
        )
        assert sorted(seen + rest) == seen + rest and len(set(seen + rest)) == 20_000
    finally:
        pair.standby.start()


async def test_a_cancelled_export_leaves_the_replica_clean_and_resumes(
    served: Served, databases: Databases
) -> None:
    # More than grpc buffers between the server and a reader that stopped, so the export's
    # transaction is still open on the standby when the reader goes away (with 5,000 users
    # it had already ended there in 1 run of 4, and "clean" checked nothing).
    await insert_users(databases, CANCELLED_EXPORT)
    await databases.replica_caught_up()
    users = user_service_pb2_grpc.UserServiceStub(served.channel)
    stream = users.StreamUsers(users_api.StreamUsersRequest(batch_size=10), timeout=DEADLINE)
    seen: list[int] = []
    token = ""
    for _ in range(3):
        batch = await stream.read()
        seen.extend(u.id for u in batch.users)
        token = batch.resume_token
    replica = await databases.replica()
    try:
        # First the export, seen on the standby: its query, inside its open snapshot.
        exporting = [
            b
            for b in await backends(replica)
            if b["state"] in ("active", "idle in transaction") and "FROM users" in b["query"]
        ]
        assert exporting, await backends(replica)
        stream.cancel()
        for _ in range(100):  # the cursor closes and its transaction ends on the standby
            open_ = [b for b in await backends(replica) if b["state"] != "idle"]
            if not open_:
                break
            await asyncio.sleep(0.05)
        assert not open_
    finally:
        await replica.close()
    rest = await drain(
        users.StreamUsers(
            users_api.StreamUsersRequest(batch_size=1000, resume_token=token), timeout=DEADLINE
        )
    )
    assert len(seen) == 30 and sorted(seen + rest) == seen + rest
    assert len(set(seen + rest)) == CANCELLED_EXPORT


EXPORTED = 50_000


@pytest.mark.slow
async def test_an_export_on_the_replica_completes_while_transfers_run_on_the_primary(
    served: Served, databases: Databases
) -> None:
    """hot_standby_feedback=on on the standby (tests/replicas/standby.py), with
    max_standby_streaming_delay=-1: VACUUM on the primary keeps the rows the export's snapshot
    needs, so replay never cancels it (the 1M-row run is in docs/scale-out.md). The export
    reads one snapshot: every user it shows with the same version of last_name, though the
    primary rewrites them all the while."""
    await insert_users(databases, EXPORTED)
    sources = [await open_account(served, "1000.00") for _ in range(4)]
    await databases.replica_caught_up()
    accounts = account_service_pb2_grpc.AccountServiceStub(served.channel)
    done = asyncio.Event()
    transfers = 0

    async def transfer() -> None:
        nonlocal transfers
        while not done.is_set():
            a, b = sources[transfers % 4], sources[(transfers + 1) % 4]
            await accounts.Transfer(
                accounts_api.TransferRequest(
                    from_account_id=a, to_account_id=b, amount="0.01", request_id=uuid.uuid4().hex
                ),
                timeout=DEADLINE,
            )
            transfers += 1

    async def rewrite_and_vacuum() -> None:
        primary = await databases.primary()
        try:
            version = 0
            while not done.is_set():
                version += 1
                await primary.execute(
                    "UPDATE users SET last_name = $1 WHERE id % 50 = 0", f"v{version}"
                )
                await primary.execute("VACUUM users")
                await primary.execute("VACUUM accounts")
                await asyncio.sleep(0.2)
        finally:
            await primary.close()

    async def export() -> list[tuple[int, str]]:
        # Without BDP probing the client's HTTP/2 window stays at 64 KiB, so the server can run
        # only a few batches ahead of this slow reader: its cursor, and its snapshot on the
        # standby, stay open for the whole export (about 5 s).
        options = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(served.address, options=options) as channel:
            stream = user_service_pb2_grpc.UserServiceStub(channel).StreamUsers(
                users_api.StreamUsersRequest(batch_size=100), timeout=120
            )
            rows = []
            async for batch in stream:
                rows.extend((u.id, u.last_name) for u in batch.users)
                await asyncio.sleep(0.01)
            return rows

    background = [asyncio.ensure_future(transfer()), asyncio.ensure_future(rewrite_and_vacuum())]
    started = time.monotonic()
    try:
        await asyncio.sleep(0.5)
        exporting = asyncio.ensure_future(export())
        await asyncio.sleep(1.0)
        replica = await databases.replica()
        try:
            on_replica = [
                b
                for b in await backends(replica)
                if "FROM users" in b["query"] and b["state"] == "idle in transaction"
            ]
        finally:
            await replica.close()
        rows = await exporting
    finally:
        done.set()
        await asyncio.gather(*background)
    elapsed = time.monotonic() - started
    assert on_replica, "the export was not seen on the standby"
    ids = [i for i, _ in rows]
    everyone = EXPORTED + len(sources)  # the accounts' owners are users too
    assert len(ids) == everyone and ids == sorted(ids) and len(set(ids)) == everyone
    rewritten = {name for i, name in rows if i % 50 == 0}
    assert len(rewritten) == 1, f"more than one snapshot: {sorted(rewritten)[:5]}"
    assert transfers > 0 and elapsed > 3


@asynccontextmanager
async def replay_cancels_reads(pair: Pair) -> AsyncIterator[None]:
    """The standby as it would be without docs/scale-out.md's advice: no hot_standby_feedback,
    and replay waits at most 100 ms for a read in its way before cancelling it. Put back to
    tests/replicas/standby.py's settings at the end."""
    standby = await asyncpg.connect(dsn(pair.standby.url("postgres")))
    try:
        await standby.execute("ALTER SYSTEM SET hot_standby_feedback = off")
        await standby.execute("ALTER SYSTEM SET max_standby_streaming_delay = '100ms'")
        await standby.execute("SELECT pg_reload_conf()")
        yield
    finally:
        for name, value in STANDBY_SETTINGS.items():
            await standby.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await standby.execute("SELECT pg_reload_conf()")
        await standby.close()


async def test_a_read_the_standby_cancels_for_replay_answers_replica_conflict(
    served: Served, databases: Databases, pair: Pair
) -> None:
    """A real recovery conflict: ListOrders on the standby has read `orders` and waits for
    `order_items`, whose lock the standby replays from the primary; the primary then locks
    `orders`, whose replay the read is in the way of, so after max_standby_streaming_delay
    the standby cancels it (SQLSTATE 40001 or 40P01, "canceling statement due to conflict
    with recovery"). The client gets UNAVAILABLE / REPLICA_CONFLICT with a RetryInfo, and the
    next call works."""
    orders = order_service_pb2_grpc.OrderServiceStub(served.channel)
    await orders.CreateOrder(
        order_service_pb2.CreateOrderRequest(
            user_id=await create_user(served),
            items=[resources_pb2.OrderItem(sku="BOOK", quantity=1, unit_price="19.99")],
            request_id=uuid.uuid4().hex,
        ),
        timeout=DEADLINE,
    )
    await databases.replica_caught_up()
    replica = await databases.replica()
    try:
        async with replay_cancels_reads(pair), table_locked_on_primary(databases, "order_items"):
            call = orders.ListOrders(order_service_pb2.ListOrdersRequest(), timeout=DEADLINE)
            listing = asyncio.ensure_future(call)
            for _ in range(200):  # the read, on the standby, holding orders, waiting for items
                waiting = [
                    b
                    for b in await backends(replica)
                    if b["wait_event_type"] == "Lock" and "order_items" in b["query"]
                ]
                if waiting:
                    break
                assert not listing.done(), "ListOrders ended before it waited on the standby"
                await asyncio.sleep(0.05)
            else:
                pytest.fail("ListOrders never waited for order_items on the standby")
            async with table_locked_on_primary(databases, "orders"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(listing, DEADLINE)
    finally:
        await replica.close()
    # The reason, and a RetryInfo delay: the client may retry (an export, resume).
    assert retry_hint(caught.value) == (grpc.StatusCode.UNAVAILABLE, "REPLICA_CONFLICT", True)
    again = await orders.ListOrders(order_service_pb2.ListOrdersRequest(), timeout=DEADLINE)
    assert len(again.orders) == 1
