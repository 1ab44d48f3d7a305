"""README promises (and those of the docs/ pages its tours and deep dives moved to) that no other
test asserted (issue 12's audit; docs/reliability.md maps every promise to its test). Real server,
real PostgreSQL, no timing bounds."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import resources_pb2 as orders_pb
from shop.v1 import user_service_pb2 as users_api
from shop.v1.user_service_pb2_grpc import UserServiceStub
from sqlalchemy import event, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.methods import METHOD_ROLES, Role
from service.config import Settings
from service.db.models import Account, AccountKind
from service.db.retry import DEFAULT_POLICY
from service.observability.logs import JsonFormatter
from service.serving.server import RunningServer, start_server
from tests.certs import make_certificates
from tests.conftest import StatementCounter
from tests.factories import Factory
from tests.ids import rid
from tests.process import STOP_TIMEOUT, service_process
from tests.rpc import rpc_fails, stream_fails
from tests.servers import own_server
from tests.streams.helpers import insert_users
from tests.tcp_proxy import database_proxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- Security -----------------------------------------------------------------------------


def test_a_read_token_may_call_exactly_get_list_and_stream() -> None:
    """README: a `read` token may call Get*, List*, Stream* and WatchChanges; every other RPC
    needs write."""
    assert METHOD_ROLES  # not vacuous
    for method, role in METHOD_ROLES.items():
        name = method.rsplit("/", 1)[1]
        expected = Role.READ if name.startswith(("Get", "List", "Stream", "Watch")) else Role.WRITE
        assert role is expected, method


async def test_every_start_without_tokens_logs_a_warning(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.serving.server")
    async with own_server(database_url):
        pass
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SHOP_AUTH_TOKENS" in r.getMessage() for r in warned), caplog.text

    caplog.clear()
    async with own_server(database_url, auth_tokens="t0ken-promise:read"):
        pass
    assert not any("SHOP_AUTH_TOKENS is unset" in r.getMessage() for r in caplog.records)


# --- Health -------------------------------------------------------------------------------


async def test_health_timeout_turns_a_silent_database_not_serving_and_back(
    database_url: str,
) -> None:
    """docs/operations.md (Health): a probe gets SHOP_HEALTH_TIMEOUT seconds; a database that stops
    answering (its connections hang, nothing is refused) makes health NOT_SERVING, where a probe
    without that bound would hang and leave SERVING standing. Once it answers again, SERVING. (20 s
    only turns a hang into a failure.)"""
    async with database_proxy(database_url) as (proxy, through_proxy):
        settings = Settings(grpc_port=0, health_interval=0.2, health_timeout=0.5)
        running = await start_server(settings, through_proxy)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await asyncio.wait_for(watch.read(), 20)).status == SERVING
                proxy.new_links_silent = True
                proxy.go_silent()
                assert (await asyncio.wait_for(watch.read(), 20)).status == NOT_SERVING
                proxy.new_links_silent = False
                assert (await asyncio.wait_for(watch.read(), 20)).status == SERVING
                watch.cancel()
        finally:
            # The proxy first: its silent connections then end, and the pool's close need not
            # wait on them.
            await proxy.close()
            await running.stop(grace=None)


# --- TLS ----------------------------------------------------------------------------------


async def test_the_certificate_files_are_read_once_at_start(
    database_url: str, tmp_path: Path
) -> None:
    """docs/operations.md (TLS): the files are read once at start, so a renewed certificate needs a
    restart. The files are replaced by another CA's while the server runs: new connections still get
    the certificate the server started with."""
    (tmp_path / "first").mkdir()
    (tmp_path / "renewed").mkdir()
    certs = make_certificates(tmp_path / "first")
    renewed = make_certificates(tmp_path / "renewed", ca_name="renewed CA")
    settings = Settings(grpc_port=0, tls_cert=certs.server.cert, tls_key=certs.server.key)
    running = await start_server(settings, database_url)
    try:
        shutil.copyfile(renewed.server.cert, certs.server.cert)
        shutil.copyfile(renewed.server.key, certs.server.key)
        address = f"127.0.0.1:{running.port}"
        request = users_api.CreateUserRequest(
            email="tls-once@example.com", first_name="T", last_name="O"
        )
        trusting_first = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
        async with grpc.aio.secure_channel(address, trusting_first) as channel:
            made = await UserServiceStub(channel).CreateUser(request, timeout=10)
        assert made.email == "tls-once@example.com"
        trusting_renewed = grpc.ssl_channel_credentials(root_certificates=renewed.ca.read_bytes())
        async with grpc.aio.secure_channel(address, trusting_renewed) as channel:
            failure = await rpc_fails(
                UserServiceStub(channel).GetUser(users_api.GetUserRequest(id=made.id), timeout=10)
            )
        assert failure.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(grace=None)


# --- Money --------------------------------------------------------------------------------


async def test_the_database_refuses_a_negative_customer_balance(
    factory: Factory, engine: AsyncEngine
) -> None:
    """docs/money.md: a CHECK keeps customer balances >= 0 (the service answers INSUFFICIENT_FUNDS
    before it comes to that; this is the database's own guard)."""
    account = await factory.account(balance="1.00")
    with pytest.raises(IntegrityError, match="balance_not_negative"):
        async with engine.begin() as conn:
            await conn.execute(
                update(Account).where(Account.id == account.id).values(balance=Decimal("-0.01"))
            )
    async with engine.connect() as conn:
        balance = await conn.scalar(select(Account.balance).where(Account.id == account.id))
    assert balance == Decimal("1.00")


async def test_stream_transfers_of_an_external_account_is_not_found(
    account_stub, factory: Factory, engine: AsyncEngine
) -> None:
    """docs/money.md: the statements (ListTransfers and StreamTransfers) answer ACCOUNT_NOT_FOUND
    for an external account's id (ListTransfers is in tests/repositories/test_ledger.py)."""
    await factory.account(balance="5.00")  # the opening deposit creates the external account
    async with engine.connect() as conn:
        external = await conn.scalar(select(Account.id).where(Account.kind == AccountKind.EXTERNAL))
    assert external is not None
    failure = await stream_fails(
        account_stub.StreamTransfers(accounts_api.StreamTransfersRequest(account_id=external))
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert failure.metadata == {"id": str(external)}


def _money_batch_statements(statements: StatementCounter) -> list[str]:
    """The statements of the money writer's batches: everything but the pool's pre-ping."""
    return [s for s in statements.statements if s.strip().upper() != "SELECT 1"]


async def test_a_money_batch_is_three_statements_whatever_its_size(
    account_stub, factory: Factory, statements: StatementCounter
) -> None:
    """docs/money.md (Group commit): a batch is applied with three statements whatever its size. A
    BatchTransfer of 1 item and one of 50 (sent alone, so each is one batch) cost the same."""
    a = await factory.account(balance="100.00")
    b = await factory.account()
    counts = []
    for size in (1, 50):
        statements.statements.clear()
        reply = await account_stub.BatchTransfer(
            accounts_api.BatchTransferRequest(
                requests=[
                    accounts_api.TransferRequest(
                        from_account_id=a.id, to_account_id=b.id, amount="1.00", request_id=rid()
                    )
                    for _ in range(size)
                ]
            )
        )
        assert [r.WhichOneof("result") for r in reply.results] == ["transfer"] * size
        counts.append(len(_money_batch_statements(statements)))
    assert counts == [3, 3], statements.statements


# --- Retries ------------------------------------------------------------------------------


async def _import(stub, emails: list[str]) -> users_api.ImportUsersResponse:
    async def messages() -> AsyncIterator[users_api.ImportUsersRequest]:
        yield users_api.ImportUsersRequest(
            users=[users_api.UpsertUser(email=e, first_name="Im", last_name="Port") for e in emails]
        )

    return await stub.ImportUsers(messages())


async def test_import_users_meeting_a_serialization_failure_answers_contention_at_once(
    user_stub, engine: AsyncEngine
) -> None:
    """docs/money.md (Locks and retries): ImportUsers cannot read its stream twice, so a 40001
    answers UNAVAILABLE / DATABASE_CONTENTION at once: one attempt, nothing written."""
    async with engine.begin() as conn:
        await conn.execute(text("CREATE SEQUENCE import_attempts"))
        await conn.execute(
            text(
                "CREATE FUNCTION fail_import() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM nextval('import_attempts'); "
                "RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER fail_import BEFORE INSERT ON users "
                "FOR EACH STATEMENT EXECUTE FUNCTION fail_import()"
            )
        )
    try:
        failure = await rpc_fails(_import(user_stub, ["a@example.com", "b@example.com"]))
        async with engine.connect() as conn:
            attempts = await conn.scalar(text("SELECT last_value FROM import_attempts"))
            users = await conn.scalar(text("SELECT count(*) FROM users"))
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER fail_import ON users"))
            await conn.execute(text("DROP FUNCTION fail_import()"))
            await conn.execute(text("DROP SEQUENCE import_attempts"))
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_CONTENTION")
    assert attempts == 1
    assert users == 0
    # Without the injected failure the same import goes through.
    assert (await _import(user_stub, ["a@example.com", "b@example.com"])).imported == 2


async def test_import_copies_new_users_straight_in_and_merges_from_a_taken_email_on(
    user_stub, statements: StatementCounter
) -> None:
    """docs/money.md (Bulk writes): each batch is COPYed straight into users in a savepoint;
    a batch meeting a taken email is rolled back to its savepoint and staged, with the batches
    after it, and the staged rows are merged by INSERT … ON CONFLICT (no plain INSERT first)."""

    def writes() -> list[str]:
        return [
            "ON CONFLICT" if "ON CONFLICT" in s.upper() else s.split()[0].upper()
            for s in statements.statements
            if s.lstrip().upper().startswith(("INSERT INTO USERS", "CREATE TEMP"))
        ]

    assert (await _import(user_stub, ["new1@example.com", "new2@example.com"])).imported == 2
    assert writes() == [], statements.statements
    assert any(s.upper().startswith("RELEASE SAVEPOINT") for s in statements.statements)

    statements.statements.clear()
    assert (await _import(user_stub, ["new1@example.com", "new3@example.com"])).imported == 2
    assert writes() == ["CREATE", "ON CONFLICT"], statements.statements
    assert any(s.upper().startswith("ROLLBACK TO SAVEPOINT") for s in statements.statements)


async def test_import_copies_on_the_sessions_own_connection_in_its_transaction(
    user_stub, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/design.md: ImportUsers' COPY reaches the driver through the session connection's
    get_raw_connection(), in the same transaction; SQLAlchemy checks the connection out and returns
    it."""
    checked_out: list[int] = []
    copies: list[tuple[int, bool]] = []

    def checkout(conn: Any, _rec: Any, _proxy: Any) -> None:
        checked_out.append(id(conn.driver_connection))

    copy = asyncpg.Connection.copy_records_to_table

    async def spied(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
        copies.append((id(self), self.is_in_transaction()))
        return await copy(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", spied)
    assert server.engine is not None
    pool = server.engine.sync_engine.pool
    event.listen(pool, "checkout", checkout)
    try:
        assert (await _import(user_stub, ["copy1@example.com", "copy2@example.com"])).imported == 2
    finally:
        event.remove(pool, "checkout", checkout)
    assert copies, "the import made no COPY"
    assert all(in_transaction for _, in_transaction in copies), copies
    assert {conn for conn, _ in copies} <= set(checked_out), (copies, checked_out)
    assert pool.checkedout() == 0  # type: ignore[attr-defined]


# --- Design notes -------------------------------------------------------------------------


async def test_an_export_reads_one_consistent_snapshot(user_stub, engine: AsyncEngine) -> None:
    """docs/design.md (Streams send batches): every batch of an export comes from one snapshot.
    After the first batch arrived, a row is inserted and a row not yet sent is changed: the export
    shows neither."""
    await insert_users(engine, 4)
    async with engine.connect() as conn:
        ids = list((await conn.scalars(text("SELECT id FROM users ORDER BY id"))).all())
    call = user_stub.StreamUsers(users_api.StreamUsersRequest(batch_size=1))
    first = await call.read()
    assert [u.id for u in first.users] == ids[:1]
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE users SET last_name = 'Changed' WHERE id = :id"), {"id": ids[-1]}
        )
    await insert_users(engine, 1)
    sent = []
    while (batch := await call.read()) is not grpc.aio.EOF:
        sent.extend(batch.users)
    assert [u.id for u in sent] == ids[1:]
    assert "Changed" not in {u.last_name for u in sent}
    # The change and the new row are there for the next export.
    again = [
        u async for b in user_stub.StreamUsers(users_api.StreamUsersRequest()) for u in b.users
    ]
    assert len(again) == 5 and again[3].last_name == "Changed"


async def test_stream_orders_and_stream_transfers_read_one_snapshot_too(
    order_stub, account_stub, factory: Factory, engine: AsyncEngine
) -> None:
    """The same for the two other exports: rows written after the first batch was sent (a new
    order and a changed status; a new transfer) are not in the rest of the export."""
    user = await factory.user()
    orders = [await factory.order(user) for _ in range(3)]
    call = order_stub.StreamOrders(orders_api.StreamOrdersRequest(user_id=user.id, batch_size=1))
    assert [o.id for o in (await call.read()).orders] == [orders[0].id]
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE orders SET status = 'paid' WHERE id = :id"), {"id": orders[-1].id}
        )
    await factory.order(user)
    rest = []
    while (batch := await call.read()) is not grpc.aio.EOF:
        rest.extend(batch.orders)
    assert [o.id for o in rest] == [o.id for o in orders[1:]]
    assert rest[-1].status == orders_pb.ORDER_STATUS_PENDING

    a, b = await factory.account(), await factory.account()
    made = [await factory.transfer(a, b, "1.00") for _ in range(3)]
    statement = account_stub.StreamTransfers(
        accounts_api.StreamTransfersRequest(account_id=a.id, batch_size=1)
    )
    assert [t.id for t in (await statement.read()).transfers] == [made[0].id]
    await factory.transfer(a, b, "2.00")
    later = []
    while (batch := await statement.read()) is not grpc.aio.EOF:
        later.extend(batch.transfers)
    assert [t.id for t in later] == [t.id for t in made[1:]]


# --- Configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
@pytest.mark.parametrize("server_compression", ["none", "gzip"])
async def test_clients_may_compress_requests_either_way(
    database_url: str, compression: grpc.Compression, server_compression: str
) -> None:
    """README (SHOP_COMPRESSION): clients may compress requests either way, whatever the
    server compresses its responses with."""
    async with own_server(database_url, compression=server_compression) as server:
        email = f"{uuid.uuid4().hex}@example.com"
        made = await server.users.CreateUser(
            users_api.CreateUserRequest(email=email, first_name="Zip", last_name="Ped"),
            compression=compression,
        )
        got = await server.users.GetUser(
            users_api.GetUserRequest(id=made.id), compression=compression
        )
    assert (got.id, got.email) == (made.id, email)


async def _always_fail(engine: AsyncEngine, table: str, sqlstate: str) -> None:
    """Every INSERT into `table` fails with `sqlstate`; the sequence counts the attempts."""
    async with engine.begin() as conn:
        await conn.execute(text("CREATE SEQUENCE promise_attempts"))
        await conn.execute(
            text(
                "CREATE FUNCTION promise_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM nextval('promise_attempts'); "
                f"RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$"
            )
        )
        await conn.execute(
            text(
                f"CREATE TRIGGER promise_fail BEFORE INSERT ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION promise_fail()"
            )
        )


async def _attempts_and_cleanup(engine: AsyncEngine, table: str) -> int:
    async with engine.begin() as conn:
        attempts = await conn.scalar(text("SELECT last_value FROM promise_attempts"))
        await conn.execute(text(f"DROP TRIGGER promise_fail ON {table}"))
        await conn.execute(text("DROP FUNCTION promise_fail()"))
        await conn.execute(text("DROP SEQUENCE promise_attempts"))
    return int(attempts)


@pytest.mark.parametrize("rpc", ["CreateUser", "Transfer"])
async def test_a_write_that_deadlocks_every_time_is_tried_five_times_then_contention(
    rpc: str, user_stub, account_stub, factory: Factory, engine: AsyncEngine
) -> None:
    """docs/money.md (Locks and retries): a deadlock is retried, whole, up to 5 attempts; then the
    answer is UNAVAILABLE / DATABASE_CONTENTION with nothing applied. For a plain write RPC
    (CreateUser) and for a money batch (Transfer)."""
    if rpc == "Transfer":
        a, b = await factory.account(balance="5.00"), await factory.account()
        table = "transfers"
        request = accounts_api.TransferRequest(
            from_account_id=a.id, to_account_id=b.id, amount="1.00", request_id=rid()
        )

        def call() -> Any:
            return account_stub.Transfer(request)
    else:
        table = "users"
        create = users_api.CreateUserRequest(email="dl@example.com", first_name="D", last_name="L")

        def call() -> Any:
            return user_stub.CreateUser(create)

    await _always_fail(engine, table, "40P01")
    try:
        failure = await rpc_fails(call())  # a grpc.aio call starts when made
    finally:
        attempts = await _attempts_and_cleanup(engine, table)
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_CONTENTION")
    assert attempts == 5
    async with engine.connect() as conn:
        if rpc == "Transfer":
            balances = await conn.execute(
                select(Account.id, Account.balance).where(Account.id.in_([a.id, b.id]))
            )
            assert dict(balances.all()) == {a.id: Decimal("5.00"), b.id: Decimal("0.00")}
        else:
            assert await conn.scalar(text("SELECT count(*) FROM users")) == 0


def test_the_retry_backoff_is_full_jitter_up_to_5_10_20_40_ms() -> None:
    policy = DEFAULT_POLICY
    assert policy.attempts == 5
    for failed, ceiling in enumerate((0.005, 0.010, 0.020, 0.040), start=1):
        delays = [policy.delay(failed) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays), (failed, max(delays))
        assert max(delays) > ceiling / 2 and min(delays) < ceiling / 2  # spread over [0, c]


@pytest.mark.parametrize(("recycle", "opened"), [(1, 2), (3600, 1)])
async def test_pool_recycle_replaces_a_connection_past_its_age(
    database_url: str, factory: Factory, recycle: int, opened: int
) -> None:
    """README (SHOP_POOL_RECYCLE): a connection older than this many seconds is replaced.
    On a pool of one, two GetUsers 1.5 s apart open a second connection only when the
    recycle age (1 s) has passed; with the default one connection serves both."""
    user = await factory.user()
    async with own_server(database_url, pool_size=1, pool_recycle=recycle) as server:
        assert server.running.engine is not None
        used: list[int] = []  # the backend pid of each checkout
        event.listen(
            server.running.engine.sync_engine.pool,
            "checkout",
            lambda conn, _rec, _proxy: used.append(conn.driver_connection.get_server_pid()),
        )
        await server.users.GetUser(users_api.GetUserRequest(id=user.id))
        await asyncio.sleep(1.5)  # past the 1 s age; not a bound on anything the server does
        await server.users.GetUser(users_api.GetUserRequest(id=user.id))
    assert len(used) >= 2 and len(set(used)) == opened, used


# --- Configuration: a process ---------------------------------------------------------------


def test_log_level_warning_keeps_info_lines_out(database_url: str, tmp_path: Path) -> None:
    """README (Configuration): SHOP_LOG_LEVEL is the logging level. At WARNING the start's
    warning is written, and no INFO line (settings, access lines) is."""
    log = tmp_path / "serve.log"
    with service_process(database_url, log, SHOP_LOG_LEVEL="WARNING") as (address, process):
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                UserServiceStub(channel).GetUser(users_api.GetUserRequest(id=424242), timeout=30)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT) == 0
    lines = log.read_text().splitlines()
    assert any(" WARNING " in line and "SHOP_AUTH_TOKENS is unset" in line for line in lines), lines
    assert not [line for line in lines if " INFO " in line], lines


# --- Observability ------------------------------------------------------------------------


def test_json_log_lines_carry_time_level_logger_message_request_id_and_extras() -> None:
    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "done %s", ("x",), None)
    record.request_id = "req-json-1"
    record.code = "OK"
    record.duration_ms = 1.5
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "INFO"
    assert entry["logger"] == "service.access"
    assert entry["message"] == "done x"
    assert entry["request_id"] == "req-json-1"
    assert (entry["code"], entry["duration_ms"]) == ("OK", 1.5)
    assert len(entry["time"]) == len("2026-11-25T12:18:42") and entry["time"][10] == "T"


async def test_shop_debug_logs_every_sql_statement(
    database_url: str, factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """README (Configuration): SHOP_DEBUG=true logs every SQL statement; without it, none.
    (No log level is set here: the statements must come from the setting alone.)"""
    user = await factory.user()

    async def statements_logged(debug: bool) -> list[str]:
        caplog.clear()
        async with own_server(database_url, debug=debug) as server:
            got = await server.users.GetUser(users_api.GetUserRequest(id=user.id))
            assert got.id == user.id
        return [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy.engine")]

    assert not any("FROM users" in m for m in await statements_logged(False))
    logged = await statements_logged(True)
    assert any("FROM users" in m for m in logged), logged


# --- The event loop -------------------------------------------------------------------------


def _loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize(("setting", "on_uvloop"), [("true", True), ("false", False)])
def test_shop_uvloop_chooses_the_serving_event_loop(
    database_url: str, tmp_path: Path, setting: str, on_uvloop: bool
) -> None:
    """README (Configuration): SHOP_UVLOOP runs the server on uvloop, or on asyncio's own loop
    when false. Seen from outside the process: uvloop's compiled loop is mapped into a serving
    process only when it runs on it (the service imports uvloop only to use it)."""
    with service_process(database_url, tmp_path / "serve.log", SHOP_UVLOOP=setting) as (
        _,
        process,
    ):
        maps = _loaded_libraries(process.pid)
    assert ("uvloop/loop" in maps) is on_uvloop


# --- Keepalive: clients that ping too often ------------------------------------------------

_EAGER_PINGER = [
    ("grpc.keepalive_time_ms", 100),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


async def _watch_until_it_ends(port: int, seconds: float) -> grpc.StatusCode | None:
    """Keep a Health Watch open from an eagerly pinging client; its end code, or None if it
    was still open after `seconds`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_EAGER_PINGER) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        try:
            async with asyncio.timeout(seconds):
                while await watch.read() is not grpc.aio.EOF:
                    pass
        except TimeoutError:
            watch.cancel()
            return None
        except grpc.aio.AioRpcError as error:
            return error.code()
        return await watch.code()


async def test_a_client_pinging_more_often_than_allowed_is_disconnected(
    database_url: str,
) -> None:
    """README (Configuration): SHOP_KEEPALIVE_MIN_PING_INTERVAL_MS: a client that pings more
    often gets GOAWAY (too_many_pings) and its call ends; the same client against a server
    that allows its rate keeps its call."""
    async with own_server(database_url, keepalive_min_ping_interval_ms=60_000) as strict:
        assert await _watch_until_it_ends(strict.running.port, 20) == grpc.StatusCode.UNAVAILABLE
    async with own_server(database_url, keepalive_min_ping_interval_ms=10) as lenient:
        assert await _watch_until_it_ends(lenient.running.port, 3) is None
