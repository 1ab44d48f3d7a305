"""A client's choices are not the server's errors: calls that their client cancels, whose deadline
passes, or whose client process dies each end with one INFO access line (CANCELLED or
DEADLINE_EXCEEDED) and leave nothing loud in the log of a real `serve` process (no ERROR, no
traceback, no library warning)."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import user_service_pb2 as users_api
from shop.v1.account_service_pb2_grpc import AccountServiceStub
from shop.v1.order_service_pb2_grpc import OrderServiceStub
from shop.v1.user_service_pb2_grpc import UserServiceStub
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.interceptors.shutdown import ActiveStreams
from tests.factories import Factory
from tests.process import ROOT, STOP_TIMEOUT, service_process
from tests.streams.helpers import SLOW_READER_OPTIONS, eventually, insert_users, lock_waiters

ROWS = 20_000  # of each export, one per message: far more than any call here reads
PACE = 0.01  # seconds per message of a reader whose deadline passes mid-stream
DEADLINE = 1.0  # seconds, for the calls whose deadline passes
# Up to twenty streams hold a connection at once: the streams' share (half the pool) fits them.
SERVE_ENV = {"SHOP_LOG_FORMAT": "json", "SHOP_POOL_SIZE": "60"}
# grpc core's own stderr lines (absl format); its INFO ones are not an operator's concern.
ABSL_INFO = re.compile(r"I\d{4} ")

Entry = dict[str, Any]


# --- reading the log ----------------------------------------------------------------------


def log_entries(log_text: str) -> list[Entry]:
    """Each line as its JSON object; a line that is not one (written past logging: Python's
    own traceback printer, grpc core's stderr) as {"level": "RAW", "message": line}."""
    entries: list[Entry] = []
    for line in log_text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else {"level": "RAW", "message": line})
    return entries


def is_loud(entry: Entry) -> bool:
    """What an operator would be paged or puzzled by: ERROR or CRITICAL from anyone, a
    traceback, a WARNING from a library (grpc, asyncio, SQLAlchemy, asyncpg) or one written for
    a call, or a line that bypassed logging (except grpc core's INFO)."""
    level, logger = entry.get("level"), str(entry.get("logger", ""))
    if level == "RAW":
        return not ABSL_INFO.match(entry["message"])
    warned = level == "WARNING" and (
        not logger.startswith("service.") or entry.get("request_id", "-") != "-"
    )
    return level in {"ERROR", "CRITICAL"} or warned or "Traceback" in json.dumps(entry)


def loud(entries: list[Entry]) -> list[Entry]:
    return [entry for entry in entries if is_loud(entry)]


def shop_access_lines(entries: list[Entry]) -> list[Entry]:
    """The access lines of shop.v1 calls (the start-up health checks left out)."""
    return [
        e
        for e in entries
        if e.get("logger") == "service.access" and str(e.get("method", "")).startswith("/shop.v1.")
    ]


def test_the_log_reader_finds_errors_tracebacks_library_warnings_and_stray_lines() -> None:
    lines = [
        {"level": "INFO", "logger": "service.access", "message": "ok", "request_id": "r1"},
        {"level": "WARNING", "logger": "service.serving.server", "message": "no tokens"},
        {"level": "ERROR", "logger": "grpc._cython.cygrpc", "message": "ExecuteBatchError"},
        {"level": "INFO", "logger": "x", "message": "m", "exception": "Traceback (most recent"},
        {"level": "WARNING", "logger": "sqlalchemy.pool.impl.AsyncAdaptedQueuePool"},
        {"level": "WARNING", "logger": "service.db", "message": "m", "request_id": "r2"},
    ]
    stray = ["Task exception was never retrieved", "I1207 10:28:27.919158 fork_posix.cc:71] x"]
    found = loud(log_entries("\n".join([*map(json.dumps, lines), *stray])))
    assert found == [*lines[2:], {"level": "RAW", "message": stray[0]}]


# --- the data the exports read -------------------------------------------------------------


async def seed(engine: AsyncEngine, factory: Factory) -> tuple[int, int]:
    """ROWS users, orders and transfers; returns (a user id, an account id)."""
    await insert_users(engine, ROWS)
    source, target = await factory.account(), await factory.account()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO orders (user_id, status, total, currency) "
                "SELECT :user_id, 'pending', 1.00, 'EUR' FROM generate_series(1, :count)"
            ),
            {"user_id": source.user_id, "count": ROWS},
        )
        await conn.execute(
            text(
                "INSERT INTO transfers (from_account_id, to_account_id, amount, request_id) "
                "SELECT :source, :target, 1.00, 'quiet-' || n FROM generate_series(1, :count) n"
            ),
            {"source": source.id, "target": target.id, "count": ROWS},
        )
    return source.user_id, source.id


# --- the client's choices ------------------------------------------------------------------


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.users = UserServiceStub(channel)
        self.orders = OrderServiceStub(channel)
        self.accounts = AccountServiceStub(channel)

    def exports(self, account_id: int, timeout: float | None = None) -> list[Any]:
        """One call of each export (all three start), one message per row."""
        return [
            self.users.StreamUsers(users_api.StreamUsersRequest(batch_size=1), timeout=timeout),
            self.orders.StreamOrders(orders_api.StreamOrdersRequest(batch_size=1), timeout=timeout),
            self.accounts.StreamTransfers(
                accounts_api.StreamTransfersRequest(account_id=account_id, batch_size=1),
                timeout=timeout,
            ),
        ]


async def code_of(call: Any) -> str:
    return str((await call.code()).name)


async def cancelled_after_first(call: Any) -> str:
    await call.read()
    call.cancel()
    return await code_of(call)


async def expired_mid_stream(call: Any) -> str:
    """Read slowly until the deadline cuts the stream."""
    try:
        async for _ in call:
            await asyncio.sleep(PACE)
    except grpc.aio.AioRpcError as error:
        return str(error.code().name)
    return "OK"


async def import_cut(stub: UserServiceStub, tag: str, deadline: float | None) -> str:
    """An ImportUsers that sends three batches and then nothing: cancelled, or cut by its
    deadline, while the server waits for the rest."""
    call = stub.ImportUsers(timeout=deadline)
    for batch in range(3):
        users = [
            users_api.UpsertUser(
                email=f"{tag}-{batch}-{n}@example.com", first_name="I", last_name="U"
            )
            for n in range(100)
        ]
        await call.write(users_api.ImportUsersRequest(users=users))
    if deadline is None:
        await asyncio.sleep(0.5)  # the batches are staged, or on their way
        call.cancel()
    return await code_of(call)


async def blocked_then_cut(
    engine: AsyncEngine, stubs: Stubs, account_id: int, user_id: int
) -> list[str]:
    """Ten calls wait on a table lock: three exports cancelled before they sent anything, and
    three exports and four unary reads whose deadlines pass while they wait."""
    async with engine.connect() as conn, conn.begin():
        await conn.execute(text("LOCK TABLE users, orders, accounts IN ACCESS EXCLUSIVE MODE"))
        streams = stubs.exports(account_id)
        waiting: list[Awaitable[Any]] = [
            *stubs.exports(account_id, DEADLINE),
            stubs.users.GetUser(users_api.GetUserRequest(id=user_id), timeout=DEADLINE),
            stubs.users.ListUsers(users_api.ListUsersRequest(page_size=10), timeout=DEADLINE),
            stubs.orders.ListOrders(orders_api.ListOrdersRequest(page_size=10), timeout=DEADLINE),
            stubs.accounts.GetAccount(
                accounts_api.GetAccountRequest(id=account_id), timeout=DEADLINE
            ),
        ]
        expired = asyncio.gather(*(code_of(call) for call in waiting))
        assert await eventually(lambda: waiters_at_least(engine, len(streams)))
        for call in streams:
            call.cancel()
        codes = [await code_of(call) for call in streams] + list(await expired)
        await conn.rollback()
    return codes


async def waiters_at_least(engine: AsyncEngine, count: int) -> bool:
    return await lock_waiters(engine) >= count


async def cut_mid_way(address: str, stubs: Stubs, account_id: int) -> list[str]:
    """Nine exports cancelled after their first message, six whose deadline passes while
    their reader is slow, and five ImportUsers streams cut half-way (three cancelled, two by
    their deadline)."""
    async with grpc.aio.insecure_channel(address, options=SLOW_READER_OPTIONS) as slow_channel:
        slow = Stubs(slow_channel)
        work: list[Awaitable[str]] = [
            *(cancelled_after_first(c) for _ in range(3) for c in stubs.exports(account_id)),
            *(expired_mid_stream(c) for _ in range(2) for c in slow.exports(account_id, DEADLINE)),
            *(import_cut(stubs.users, f"cancel{n}", None) for n in range(3)),
            *(import_cut(stubs.users, f"expire{n}", DEADLINE) for n in range(2)),
        ]
        return list(await asyncio.gather(*work))


def read_when(log: Path, ready: Callable[[list[Entry]], bool]) -> None:
    """Wait until `ready` holds of the log's entries (the server, another process, ends a call
    a moment after its client saw it end); the 20 s cap only tells a hang from a loaded machine."""
    give_up = time.monotonic() + 20
    while not ready(log_entries(log.read_text())) and time.monotonic() < give_up:
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=STOP_TIMEOUT) == 0


async def test_thirty_cancelled_or_expired_calls_log_one_info_line_each_and_nothing_loud(
    database_url: str, engine: AsyncEngine, factory: Factory, tmp_path: Path
) -> None:
    user_id, account_id = await seed(engine, factory)
    log = tmp_path / "serve.log"
    with service_process(database_url, log, **SERVE_ENV) as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            stubs = Stubs(channel)
            codes = await blocked_then_cut(engine, stubs, account_id, user_id)
            codes += await cut_mid_way(address, stubs, account_id)
        read_when(log, lambda entries: len(shop_access_lines(entries)) >= len(codes))
        stop(process)

    expected = {"CANCELLED": 15, "DEADLINE_EXCEEDED": 15}
    assert {code: codes.count(code) for code in set(codes)} == expected
    entries = log_entries(log.read_text())
    assert loud(entries) == []
    access = shop_access_lines(entries)
    assert {e["level"] for e in access} == {"INFO"}
    seen = [e["code"] for e in access]
    assert {code: seen.count(code) for code in set(seen)} == expected, seen
    async with engine.connect() as conn:  # grpc hands a cut client stream over as its end
        imported = await conn.scalar(text("SELECT count(*) FROM users WHERE first_name = 'I'"))
    assert imported == 0


# A client process that reads one message of StreamUsers through a small window (the server is
# then mid-stream, waiting to write), says so, and waits to be killed.
KILLED_CLIENT = textwrap.dedent(
    """
    import sys, time, grpc
    from shop.v1 import user_service_pb2 as api
    from shop.v1.user_service_pb2_grpc import UserServiceStub

    channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.http2.bdp_probe", 0)])
    stream = UserServiceStub(channel).StreamUsers(api.StreamUsersRequest(batch_size=1))
    next(stream)
    print("read", flush=True)
    time.sleep(600)
    """
)


async def test_a_killed_client_process_leaves_one_cancelled_line_and_nothing_loud(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    await insert_users(engine, ROWS)
    log = tmp_path / "serve.log"
    with service_process(database_url, log, **SERVE_ENV) as (address, process):
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_CLIENT, address, cwd=ROOT, stdout=subprocess.PIPE
        )
        try:
            assert client.stdout is not None
            assert await client.stdout.readline() == b"read\n"
        finally:
            client.kill()  # SIGKILL: no goodbye, the server sees the connection drop
            await client.wait()
        read_when(log, lambda entries: len(shop_access_lines(entries)) >= 1)
        stop(process)

    entries = log_entries(log.read_text())
    assert loud(entries) == []
    [access] = shop_access_lines(entries)
    assert (access["method"], access["code"], access["level"]) == (
        "/shop.v1.UserService/StreamUsers",
        "CANCELLED",
        "INFO",
    )


async def test_a_stream_step_failing_as_its_call_is_cancelled_is_not_reported_as_lost() -> None:
    """ActiveStreams runs each step of a stream as a task of its own. One that fails in the
    loop turn its call is cancelled (seen: an export refused for want of a connection as its
    deadline passed) was left for asyncio to log as "Task exception was never retrieved"."""

    async def refused(request: Any, context: Any) -> AsyncIterator[int]:
        raise RuntimeError("refused")
        yield 0  # an async generator, as the servicers' streams are

    handler = grpc.unary_stream_rpc_method_handler(refused)
    stream = ActiveStreams().wrap("/shop.v1.UserService/StreamUsers", handler).unary_stream

    async def read() -> None:
        async for _ in stream(None, None):
            pass

    lost: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, report: lost.append(report))
    try:
        call = asyncio.create_task(read())
        await asyncio.sleep(0)  # the call starts its first step and waits for it
        await asyncio.sleep(0)  # the step fails; the call has not woken up yet
        call.cancel()
        await asyncio.wait((call,))
        cancelled = call.cancelled()
        del call  # its CancelledError's traceback holds the step
        gc.collect()  # asyncio reports a lost exception when its task is collected
    finally:
        loop.set_exception_handler(previous)
    assert cancelled
    assert lost == []
