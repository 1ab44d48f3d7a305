"""README promises about the command line, each checked on the real command in a subprocess:
`python -m service purge-idempotency-keys` (what it removes, what it prints, its exit code) and
`SHOP_LOG_FORMAT=text` (readable lines with the request id in brackets, not JSON)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import user_service_pb2 as users_api
from shop.v1.user_service_pb2_grpc import UserServiceStub
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import Factory
from tests.process import ROOT, STOP_TIMEOUT, service_env, service_process
from tests.rpc import rpc_fails

# What configure_logging's text format writes: time, level, logger, [request id]: message.
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+ "
    r"\[[^\]]+\]: "
)


def purge(database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service purge-idempotency-keys`, as cron would run it."""
    return subprocess.run(
        [sys.executable, "-m", "service", "purge-idempotency-keys"],
        cwd=ROOT,
        env=service_env(database_url, 0) | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _keys(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT request_id FROM idempotency_keys"))
        return set(rows.scalars())


async def _age(engine: AsyncEngine, request_id: str, hours: float) -> None:
    """Make a key look `hours` old."""
    async with engine.begin() as conn:
        aged = await conn.execute(
            text(
                "UPDATE idempotency_keys SET created_at = now() - make_interval(secs => :s) "
                "WHERE request_id = :id"
            ),
            {"s": hours * 3600, "id": request_id},
        )
        assert aged.rowcount == 1, request_id


async def test_purge_command_forgets_keys_past_the_retention_and_says_how_many(
    database_url: str, engine: AsyncEngine, account_stub: Any, factory: Factory
) -> None:
    ada, bob = await factory.user(), await factory.user()

    def open_for(user_id: int, request_id: str) -> Any:
        return account_stub.OpenAccount(
            accounts_api.OpenAccountRequest(user_id=user_id, currency="EUR", request_id=request_id)
        )

    old = await open_for(ada.id, "open-old")
    recent = await open_for(bob.id, "open-recent")
    await account_stub.Deposit(
        accounts_api.DepositRequest(account_id=old.id, amount="1.00", request_id="dep-old")
    )
    await _age(engine, "open-old", 25)
    await _age(engine, "dep-old", 25)
    await _age(engine, "open-recent", 23)

    done = await asyncio.to_thread(purge, database_url)  # the default retention: 24 h

    assert done.returncode == 0, done.stderr
    assert "purged 2 idempotency keys older than 1 day, 0:00:00" in done.stderr, done.stderr
    assert await _keys(engine) == {"open-recent"}
    # docs/money.md's consequences: a purged OpenAccount request_id opens a new account; a kept
    # one still answers with the stored account; a Deposit's stays taken (the journal has it).
    assert (await open_for(ada.id, "open-old")).id != old.id
    assert (await open_for(bob.id, "open-recent")).id == recent.id
    reused = await rpc_fails(
        account_stub.Deposit(
            accounts_api.DepositRequest(account_id=old.id, amount="1.00", request_id="dep-old")
        )
    )
    assert reused.reason == "REQUEST_ID_REUSED"

    # SHOP_IDEMPOTENCY_RETENTION_HOURS sets the cut: at half an hour the 23-hour-old key goes
    # too, the one just made stays; nothing left to purge is still a success.
    done = await asyncio.to_thread(purge, database_url, SHOP_IDEMPOTENCY_RETENTION_HOURS="0.5")
    assert done.returncode == 0, done.stderr
    assert "purged 1 idempotency keys older than 0:30:00" in done.stderr, done.stderr
    assert await _keys(engine) == {"open-old"}
    done = await asyncio.to_thread(purge, database_url, SHOP_IDEMPOTENCY_RETENTION_HOURS="0.5")
    assert done.returncode == 0, done.stderr
    assert "purged 0 idempotency keys" in done.stderr, done.stderr


def test_text_log_format_writes_readable_lines_with_the_request_id(
    database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with service_process(database_url, log, SHOP_LOG_FORMAT="text") as (address, process):
        channel = grpc.insecure_channel(address)
        with channel, pytest.raises(grpc.RpcError) as missing:
            UserServiceStub(channel).GetUser(
                users_api.GetUserRequest(id=424242),
                metadata=(("x-request-id", "text-log-1"),),
                timeout=10,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # The access line is written after the answer is sent: stop the server the usual way,
        # so every line is written (and the shutdown's lines are read too).
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT) == 0, log.read_text()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert TEXT_LINE.match(line), f"not a text log line: {line!r}"
        try:
            json.loads(line)
        except ValueError:
            pass
        else:
            raise AssertionError(f"a JSON line under SHOP_LOG_FORMAT=text: {line!r}")
    access = [line for line in lines if " service.access [text-log-1]: " in line]
    assert len(access) == 1, lines
    assert "/shop.v1.UserService/GetUser NOT_FOUND" in access[0]


def test_serve_with_the_relay_asked_for_but_nats_missing_exits_2_with_one_line() -> None:
    """SHOP_CHANGES_NATS_URL set where nats-py is not installed (the Docker image leaves the
    extra out): status 2 and one line naming the variable, before any database is touched
    (the URL here names no server at all)."""
    hide_nats = (
        "import sys; sys.modules['nats'] = None; from service.__main__ import main; main(['serve'])"
    )
    env = service_env("postgresql+asyncpg://nobody@127.0.0.1:1/none", 0) | {
        "SHOP_CHANGES_NATS_URL": "nats://127.0.0.1:4222"
    }
    done = subprocess.run(
        [sys.executable, "-c", hide_nats],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SHOP_CHANGES_NATS_URL" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
