"""SHOP_WORKERS=2: two processes serve one port, each with its own pool; SIGTERM stops all."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import psutil
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.process import STOP_TIMEOUT, service_process
from tests.rpc import rpc_fails

MAX_CALLS = 200


async def pids_that_served_get_user(engine: AsyncEngine) -> set[int]:
    """Workers whose pool connection last ran GetUser's query. A pool connection is named after
    its process (application_name "shop-service/<pid>") and pg_stat_activity keeps its last
    query: per-call evidence, unlike the connection itself, which a worker opens on startup."""
    async with engine.connect() as conn:
        names = await conn.scalars(
            text(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'shop-service/%' "
                "AND query LIKE 'SELECT users.id%WHERE users.id = %'"
            )
        )
        return {int(name.rsplit("/", 1)[1]) for name in names}


async def test_two_workers_share_the_port_and_stop_on_sigterm(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with service_process(database_url, log, SHOP_WORKERS="2") as (address, process):
        # (multiprocessing's resource tracker is a child too, but not a worker)
        workers = {
            child.pid
            for child in psutil.Process(process.pid).children()
            if "spawn_main" in " ".join(child.cmdline())
        }
        assert len(workers) == 2

        # Each channel gets a new TCP connection (its own subchannel pool: grpc would otherwise
        # reuse the last one), which the kernel hands to one of the listening sockets.
        for _ in range(MAX_CALLS):
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(address, options=options) as channel:
                stub = user_service_pb2_grpc.UserServiceStub(channel)
                failure = await rpc_fails(stub.GetUser(api.GetUserRequest(id=1), timeout=10))
                assert failure.reason == "USER_NOT_FOUND"
            # (this test process's own in-process server may show up too: other tests use it)
            if workers <= await pids_that_served_get_user(engine):
                break
        assert workers <= await pids_that_served_get_user(engine), log.read_text()

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT) == 0, log.read_text()
    assert not any(psutil.pid_exists(pid) for pid in workers)
