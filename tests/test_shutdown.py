"""Graceful shutdown of a real `python -m service serve` process on a real SIGTERM: health goes
NOT_SERVING, a response stream ends with UNAVAILABLE at once (one held back by a slow reader as
soon as its write is taken, and it resumes exactly), new calls are refused, a unary call that
was running (held on a row lock this test owns) still finishes OK, and the exit code is 0;
one still held when SHOP_SHUTDOWN_GRACE runs out is cancelled, writes nothing, and the exit code
is still 0. With SHOP_SHUTDOWN_DRAIN_DELAY, health says NOT_SERVING while calls are still served
for the delay (a second signal cuts it short). And stop() closes the pool of a database gone
silent within its bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    order_service_pb2,
    order_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.interceptors.shutdown import SHUTTING_DOWN
from service.config import Settings
from service.serving.server import POOL_CLOSE_SECONDS, start_server
from service.serving.shutdown import REPEAT_AFTER
from tests.process import service_process
from tests.streams.helpers import insert_users, read_until_cut, resume
from tests.tcp_proxy import database_proxy

WAIT = 30.0  # bound on each expected event; none of them should take more than a second
GRACE = "60"  # long, so the unary call is done by the test's release, not by the grace expiring


async def _lock_waiters(engine: AsyncEngine, expected: int) -> None:
    """Until `expected` backends of this database wait on a lock (the server's two calls)."""
    deadline = time.monotonic() + WAIT
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while True:
        # A new connection each time: pg_stat_activity is a snapshot per transaction.
        async with engine.connect() as conn:
            waiting = (await conn.execute(query)).scalar_one()
        if waiting >= expected:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{waiting} of {expected} calls reached their lock in {WAIT:.0f}s")
        await asyncio.sleep(0.1)


async def _drain(call: Any) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await call.read() is not grpc.aio.EOF:
            pass


async def _open_account(channel: grpc.aio.Channel, tag: str) -> Any:
    """A new user's EUR account, opened through the server under test."""
    user = await user_service_pb2_grpc.UserServiceStub(channel).CreateUser(
        user_service_pb2.CreateUserRequest(
            email=f"{tag}@example.com", first_name=tag.title(), last_name="Shutdown"
        )
    )
    return await account_service_pb2_grpc.AccountServiceStub(channel).OpenAccount(
        account_service_pb2.OpenAccountRequest(
            user_id=user.id, currency="EUR", request_id=f"open-{tag}"
        )
    )


async def test_sigterm_finishes_unary_ends_streams_and_exits_0(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with service_process(database_url, log, SHOP_SHUTDOWN_GRACE=GRACE) as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            accounts = account_service_pb2_grpc.AccountServiceStub(channel)
            orders = order_service_pb2_grpc.OrderServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            account = await _open_account(channel, "sigterm")
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            async with engine.connect() as conn:
                held = await conn.begin()
                # The deposit waits for this row lock; the stream waits for this table lock.
                await conn.execute(
                    text("SELECT id FROM accounts WHERE id = :id FOR UPDATE"), {"id": account.id}
                )
                await conn.execute(text("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"))
                deposit = asyncio.ensure_future(
                    accounts.Deposit(
                        account_service_pb2.DepositRequest(
                            account_id=account.id, amount="5.00", request_id="dep-sigterm"
                        ),
                        timeout=WAIT * 3,
                    )
                )
                stream = orders.StreamOrders(order_service_pb2.StreamOrdersRequest())
                await _lock_waiters(engine, 2)

                process.send_signal(signal.SIGTERM)

                status = await asyncio.wait_for(watch.read(), WAIT)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
                await asyncio.wait_for(_drain(stream), WAIT)
                assert await stream.code() == grpc.StatusCode.UNAVAILABLE
                assert await stream.details() == "server shutting down"
                async with grpc.aio.insecure_channel(address) as fresh:
                    stub = user_service_pb2_grpc.UserServiceStub(fresh)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        request = user_service_pb2.GetUserRequest(id=account.user_id)
                        await stub.GetUser(request, timeout=5)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                # Still waiting on our lock: shutdown did not cut it off.
                assert not deposit.done()
                assert process.poll() is None
                await held.commit()

            deposited = await asyncio.wait_for(deposit, WAIT)
            assert deposited.balance == "5.00"

        try:
            code = await asyncio.to_thread(process.wait, WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {WAIT:.0f}s after the last call ended:\n{log.read_text()}")
        assert code == 0, f"exit code {code}:\n{log.read_text()}"


SHORT_GRACE = 3.0  # long enough that the deposit is surely still inside it when checked below


async def test_a_call_still_running_when_the_grace_runs_out_is_cancelled_and_exits_0(
    database_url: str, engine: AsyncEngine, account_stub: Any, tmp_path: Path
) -> None:
    """docs/operations.md, shutdown steps 3 and 4: calls still running after SHOP_SHUTDOWN_GRACE
    are cancelled, the process still exits 0, and the cancelled write left nothing behind."""
    log = tmp_path / "serve.log"
    grace = {"SHOP_SHUTDOWN_GRACE": str(SHORT_GRACE)}
    with service_process(database_url, log, **grace) as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            accounts = account_service_pb2_grpc.AccountServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            account = await _open_account(channel, "grace")
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            async with engine.connect() as conn:
                held = await conn.begin()
                await conn.execute(
                    text("SELECT id FROM accounts WHERE id = :id FOR UPDATE"), {"id": account.id}
                )
                deposit = asyncio.ensure_future(
                    accounts.Deposit(
                        account_service_pb2.DepositRequest(
                            account_id=account.id, amount="5.00", request_id="dep-grace"
                        ),
                        timeout=WAIT * 3,
                    )
                )
                await _lock_waiters(engine, 1)

                process.send_signal(signal.SIGTERM)
                status = await asyncio.wait_for(watch.read(), WAIT)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert not deposit.done(), "cut off before its grace ran out"

                # The lock is held past the grace, and past the drain that lets the money
                # writer's batch run on (serving/server.py): the call is cancelled, the batch
                # rolled back.
                with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                    await asyncio.wait_for(deposit, WAIT)
                assert cancelled.value.code() in (
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNAVAILABLE,
                ), cancelled.value
                try:
                    code = await asyncio.to_thread(process.wait, WAIT)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"still running {WAIT:.0f}s after the grace:\n{log.read_text()}")
                assert code == 0, f"exit code {code}:\n{log.read_text()}"
                await held.rollback()

    # Nothing half-written: no journal row, no balance change, no stored key.
    async with engine.connect() as conn:
        for table in ("transfers", "idempotency_keys"):
            query = text(f"SELECT count(*) FROM {table} WHERE request_id = 'dep-grace'")
            assert (await conn.execute(query)).scalar_one() == 0, table
        balance = text("SELECT balance FROM accounts WHERE id = :id")
        assert (await conn.execute(balance, {"id": account.id})).scalar_one() == 0
    # And the request_id is free: the client's retry, on another server, applies it once.
    retried = await account_stub.Deposit(
        account_service_pb2.DepositRequest(
            account_id=account.id, amount="5.00", request_id="dep-grace"
        )
    )
    assert retried.balance == "5.00"


# --- A stream cut while its reader is behind -------------------------------------------------

EXPORT_USERS = 30_000  # ~2.2 MB: far more than the reader's window and the server's one message
EXPORT_BATCH = 200


async def test_an_export_cut_by_sigterm_ends_unavailable_and_resumes_exactly(
    database_url: str, engine: AsyncEngine, user_stub: Any, tmp_path: Path
) -> None:
    """Issue 13: a slow reader's export, its server held back by flow control (the stream waits
    on a write, not on the database), ends with UNAVAILABLE "server shutting down" after a
    SIGTERM; resumed from its last token on another server, every user arrives exactly once."""
    await insert_users(engine, EXPORT_USERS)
    async with engine.connect() as conn:
        everyone = list((await conn.scalars(text("SELECT id FROM users ORDER BY id"))).all())
    log = tmp_path / "serve.log"
    with service_process(database_url, log, SHOP_SHUTDOWN_GRACE="3") as (address, process):
        cut = await read_until_cut(
            address, EXPORT_BATCH, lambda: process.send_signal(signal.SIGTERM)
        )
        assert cut.error is not None, "the export finished before the shutdown cut it"
        assert cut.error.code() == grpc.StatusCode.UNAVAILABLE, cut.error
        assert cut.error.details() == SHUTTING_DOWN
        try:
            code = await asyncio.to_thread(process.wait, WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {WAIT:.0f}s after the cut:\n{log.read_text()}")
        assert code == 0, f"exit code {code}:\n{log.read_text()}"
    assert 0 < len(cut.ids) < len(everyone)
    # The session's server plays the other replica (same page-token secret).
    assert cut.ids + await resume(user_stub, cut.token) == everyone


# --- The drain delay ----------------------------------------------------------------------

DRAIN = 1.5  # SHOP_SHUTDOWN_DRAIN_DELAY for these tests: short, and long beside a GetUser
NOTICED_WITHIN = 1.0  # from SIGTERM to Check saying NOT_SERVING: a loop turn, in fact


async def _check(health: health_pb2_grpc.HealthStub) -> Any:
    """Check's status; an error (UNAVAILABLE, CANCELLED) fails the test where it happens."""
    return (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def _first_refusal(address: str, user_id: int) -> float:
    """GetUser on a new connection, again and again, until one is refused; returns when, on the
    monotonic clock. Every call before it must succeed.

    Refused is UNAVAILABLE, or CANCELLED for a call that reached the server in the instant it
    stopped: grpc core ends a call it received but never handed to a handler with CANCELLED
    (grpc/grpc#41785, open). Either way the call was not served, which is what is measured."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        async with grpc.aio.insecure_channel(address) as fresh:
            stub = user_service_pb2_grpc.UserServiceStub(fresh)
            try:
                await stub.GetUser(user_service_pb2.GetUserRequest(id=user_id), timeout=5)
            except grpc.aio.AioRpcError as error:
                refused = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                assert error.code() in refused, error
                return time.monotonic()
        await asyncio.sleep(0.05)
    pytest.fail(f"calls still served {WAIT:.0f}s after SIGTERM")


async def test_sigterm_says_not_serving_while_still_serving_for_the_drain_delay(
    database_url: str, tmp_path: Path
) -> None:
    """Issue 13's rolling restart: after SIGTERM a Check answers NOT_SERVING (not UNAVAILABLE)
    at once, an open Watch receives NOT_SERVING, calls are still served, on open and new
    connections alike; only after SHOP_SHUTDOWN_DRAIN_DELAY are new calls refused, and the
    process exits 0, having logged each phase."""
    log = tmp_path / "serve.log"
    delay = {"SHOP_SHUTDOWN_DRAIN_DELAY": str(DRAIN)}
    with service_process(database_url, log, **delay) as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            user = await users.CreateUser(
                user_service_pb2.CreateUserRequest(
                    email="drain@example.com", first_name="Dr", last_name="Ain"
                )
            )
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while (status := await _check(health)) == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() - signalled < NOTICED_WITHIN, "still SERVING"
                await asyncio.sleep(0.02)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            reply = await asyncio.wait_for(watch.read(), WAIT)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            # Made after NOT_SERVING was seen, so inside the drain delay: served as ever.
            request = user_service_pb2.GetUserRequest(id=user.id)
            assert (await users.GetUser(request, timeout=5)).email == "drain@example.com"
            async with grpc.aio.insecure_channel(address) as fresh:
                stub = user_service_pb2_grpc.UserServiceStub(fresh)
                assert (await stub.GetUser(request, timeout=5)).email == "drain@example.com"

            refused_at = await _first_refusal(address, user.id)
            assert refused_at - signalled >= DRAIN, "refused before the drain delay ran out"

        try:
            code = await asyncio.to_thread(process.wait, WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {WAIT:.0f}s after the drain delay:\n{log.read_text()}")
        assert code == 0, f"exit code {code}:\n{log.read_text()}"
    phases = (
        "SIGTERM: shutting down",
        "health NOT_SERVING; still serving for 1.5s",
        "refusing new calls",
        "closing the database pool",
        "stopped",
    )
    text = log.read_text()
    assert [phase for phase in phases if phase not in text] == [], text


async def test_a_second_signal_skips_the_rest_of_the_drain_delay(
    database_url: str, tmp_path: Path
) -> None:
    """Ctrl-C twice in `make run`: the second SIGINT ends a 60 s drain delay at once."""
    log = tmp_path / "serve.log"
    delay = {"SHOP_SHUTDOWN_DRAIN_DELAY": "60"}
    with service_process(database_url, log, **delay) as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signal.SIGINT)
            reply = await asyncio.wait_for(watch.read(), WAIT)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await asyncio.sleep(REPEAT_AFTER)  # sooner, it is the same Ctrl-C seen twice
            process.send_signal(signal.SIGINT)
            try:
                code = await asyncio.to_thread(process.wait, WAIT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the second SIGINT did not end the delay:\n{log.read_text()}")
            assert code == 0, f"exit code {code}:\n{log.read_text()}"


# --- A database gone silent ---------------------------------------------------------------


async def test_stop_closes_the_pool_of_a_silent_database_within_its_bound(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool's graceful close waits, unbounded, for the database to hang up; one whose
    packets vanish never does. stop() ends it after POOL_CLOSE_SECONDS by terminating the
    connections, with one warning and no traceback."""
    grace = 0.5
    async with database_proxy(database_url) as (proxy, through_proxy):
        # No probe after the first: only the pool's close meets the silence.
        settings = Settings(grpc_port=0, pool_size=2, max_overflow=0, health_interval=3600)
        running = await start_server(settings, through_proxy)
        stopping = False
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                users = user_service_pb2_grpc.UserServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError):  # NOT_FOUND, from a pooled connection
                    await users.GetUser(user_service_pb2.GetUserRequest(id=1), timeout=5)
            proxy.go_silent()
            caplog.clear()
            caplog.set_level(logging.INFO)
            started = time.monotonic()
            stopping = True
            await asyncio.wait_for(running.stop(grace), WAIT)
            took = time.monotonic() - started
        finally:
            if not stopping:
                await running.stop(grace=None)
    assert took < grace + POOL_CLOSE_SECONDS + 2, f"stop() took {took:.1f}s"
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.levelname) for r in loud] == [("service.db.closing", "WARNING")], [
        r.getMessage() for r in loud
    ]
    assert not any(r.exc_info for r in caplog.records)
