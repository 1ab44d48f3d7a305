"""The service behind PgBouncer in transaction mode (SHOP_PGBOUNCER=true): Debian's pgbouncer,
started here on its own port in front of the test database, serves concurrent calls of every
service, streams included, with no prepared-statement clash."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import (
    account_service_pb2_grpc,
    order_service_pb2_grpc,
    resources_pb2,
    user_service_pb2_grpc,
)
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import user_service_pb2 as users_api
from sqlalchemy.engine import make_url

from deploy.processes import free_port, stop
from service.config import Settings
from service.serving.server import RunningServer, start_server
from tests import tools

PGBOUNCER = tools.PGBOUNCER.path()
CLIENTS = 12
DEADLINE = 30.0

pytestmark = pytest.mark.requires(tools.PGBOUNCER)


def socket_dir(database_url: str) -> str | None:
    """The Unix socket directory of a URL like postgresql+asyncpg://u@/db?host=/dir (the
    embedded PostgreSQL's form), or None for a TCP URL."""
    url = make_url(database_url)
    host = url.query.get("host")
    return None if url.host or not host else str(host)


def pgbouncer_ini(root: Path, port: int, database_url: str) -> Path:
    url = make_url(database_url)
    host = url.host or socket_dir(database_url)
    (root / "userlist.txt").write_text(f'"{url.username}" ""\n')
    ini = root / "pgbouncer.ini"
    password = f" password={url.password}" if url.password else ""
    ini.write_text(
        f"""[databases]
shop = host={host} port={url.port or 5432} dbname={url.database} user={url.username}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/userlist.txt
pool_mode = transaction
default_pool_size = 4
max_client_conn = 200
; DISCARD ALL after every transaction: named statements a client prepared are dropped with it
server_reset_query = DISCARD ALL
server_reset_query_always = 1
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
"""
    )
    return ini


@pytest.fixture
def pgbouncer_url(database_url: str) -> Iterator[str]:
    """A pgbouncer of this test's own, in transaction mode, in front of the test database."""
    assert PGBOUNCER is not None
    with tempfile.TemporaryDirectory(prefix="shop-pgbouncer-") as tmp:
        root, port = Path(tmp), free_port()
        ini = pgbouncer_ini(root, port, database_url)
        command = [PGBOUNCER, str(ini)]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            # Run it as the user that may reach the server: over TCP anyone, over a Unix
            # socket (the embedded PostgreSQL) the socket directory's owner.
            sockets = socket_dir(database_url)
            user = Path(sockets).owner() if sockets else "postgres"
            shutil.chown(root, user)
            for path in root.iterdir():
                shutil.chown(path, user)
            command = ["runuser", "-u", user, "--", *command]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log = (
                            (root / "pgbouncer.log").read_text()
                            if (root / "pgbouncer.log").exists()
                            else ""
                        )
                        out = process.stdout.read().decode() if process.stdout else ""
                        pytest.fail(f"pgbouncer did not start:\n{out}\n{log}")
                    time.sleep(0.1)
            yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/shop"
        finally:
            stop([process], 10)


@pytest_asyncio.fixture
async def bounced_channel(pgbouncer_url: str) -> AsyncIterator[grpc.aio.Channel]:
    settings = Settings(grpc_host="127.0.0.1", grpc_port=0, pool_size=10, pgbouncer=True)
    running: RunningServer = await start_server(settings, pgbouncer_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel
    finally:
        await running.stop(grace=None)


async def one_client(channel: grpc.aio.Channel, n: int) -> dict[str, int]:
    """Every service, unary and streaming, as one customer's session; returns what it made."""
    users = user_service_pb2_grpc.UserServiceStub(channel)
    orders = order_service_pb2_grpc.OrderServiceStub(channel)
    accounts = account_service_pb2_grpc.AccountServiceStub(channel)
    t = {"timeout": DEADLINE}

    user = await users.CreateUser(
        users_api.CreateUserRequest(
            email=f"pgb{n}@example.com", first_name="Pg", last_name=f"B{n}"
        ),
        **t,
    )
    assert (await users.GetUser(users_api.GetUserRequest(id=user.id), **t)).email == user.email
    await users.UpsertUsers(
        users_api.UpsertUsersRequest(
            users=[
                users_api.UpsertUser(email=f"pgb{n}-up@example.com", first_name="U", last_name="P")
            ]
        ),
        **t,
    )

    async def import_batches() -> AsyncIterator[users_api.ImportUsersRequest]:
        for batch in range(2):
            yield users_api.ImportUsersRequest(
                users=[
                    users_api.UpsertUser(
                        email=f"pgb{n}-imp{batch}-{i}@example.com", first_name="I", last_name="M"
                    )
                    for i in range(5)
                ]
            )

    assert (await users.ImportUsers(import_batches(), **t)).imported == 10
    page = await users.ListUsers(users_api.ListUsersRequest(page_size=3), **t)
    if page.next_page_token:
        await users.ListUsers(
            users_api.ListUsersRequest(page_size=3, page_token=page.next_page_token), **t
        )
    streamed_users = sum(
        [
            len(b.users)
            async for b in users.StreamUsers(users_api.StreamUsersRequest(batch_size=7), **t)
        ]
    )

    items = [resources_pb2.OrderItem(sku="PGB", quantity=1, unit_price="2.00")]
    order = await orders.CreateOrder(
        orders_api.CreateOrderRequest(user_id=user.id, items=items, request_id=f"pgb-o-{n}"), **t
    )
    again = await orders.CreateOrder(
        orders_api.CreateOrderRequest(user_id=user.id, items=items, request_id=f"pgb-o-{n}"), **t
    )
    assert again.id == order.id
    assert (await orders.GetOrder(orders_api.GetOrderRequest(id=order.id), **t)).user.id == user.id
    await orders.UpdateOrderStatus(
        orders_api.UpdateOrderStatusRequest(id=order.id, status=resources_pb2.ORDER_STATUS_PAID),
        **t,
    )
    await orders.ListOrders(orders_api.ListOrdersRequest(user_id=user.id), **t)
    streamed_orders = sum(
        [
            len(b.orders)
            async for b in orders.StreamOrders(orders_api.StreamOrdersRequest(user_id=user.id), **t)
        ]
    )

    a = await accounts.OpenAccount(
        accounts_api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=f"pgb-a-{n}"),
        **t,
    )
    b = await accounts.OpenAccount(
        accounts_api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=f"pgb-b-{n}"),
        **t,
    )
    await accounts.Deposit(
        accounts_api.DepositRequest(account_id=a.id, amount="10.00", request_id=f"pgb-d-{n}"), **t
    )
    await accounts.Withdraw(
        accounts_api.WithdrawRequest(account_id=a.id, amount="1.00", request_id=f"pgb-w-{n}"), **t
    )
    for k in range(3):
        await accounts.Transfer(
            accounts_api.TransferRequest(
                from_account_id=a.id, to_account_id=b.id, amount="1.50", request_id=f"pgb-t-{n}-{k}"
            ),
            **t,
        )
    listed = await accounts.ListTransfers(accounts_api.ListTransfersRequest(account_id=b.id), **t)
    streamed = [
        x
        async for batch in accounts.StreamTransfers(
            accounts_api.StreamTransfersRequest(account_id=b.id), **t
        )
        for x in batch.transfers
    ]
    assert len(listed.transfers) >= 3 and len(streamed) == len(listed.transfers)
    assert (
        await accounts.GetAccount(accounts_api.GetAccountRequest(id=a.id), **t)
    ).balance == "4.50"
    assert (
        await accounts.GetAccount(accounts_api.GetAccountRequest(id=b.id), **t)
    ).balance == "4.50"
    return {"streamed_users": streamed_users, "streamed_orders": streamed_orders}


async def test_service_behind_pgbouncer_transaction_mode_serves_every_service(
    bounced_channel: grpc.aio.Channel,
) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(*(one_client(bounced_channel, n) for n in range(CLIENTS))), 120
    )
    assert len(results) == CLIENTS
    assert all(r["streamed_orders"] == 1 and r["streamed_users"] >= 12 for r in results)
    reply = await health_pb2_grpc.HealthStub(bounced_channel).Check(
        health_pb2.HealthCheckRequest(), timeout=DEADLINE
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
