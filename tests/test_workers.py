"""SHOP_WORKERS=2: two processes serve one port, each with its own pool; SIGTERM stops all; with
metrics on, the parent serves one /metrics that adds up both workers."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import psutil
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.process import STOP_TIMEOUT, free_port, service_process
from tests.rpc import rpc_fails
from tests.servers import rpc, scrape_port

MAX_CALLS = 200
CALLERS = 8  # connections at once, each its own (the kernel spreads them over the workers)
CALLS_EACH = 25
MAX_ROUNDS = 20


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


def worker_pids(process_pid: int) -> set[int]:
    # (multiprocessing's resource tracker is a child too, but not a worker)
    return {
        child.pid
        for child in psutil.Process(process_pid).children()
        if "spawn_main" in " ".join(child.cmdline())
    }


async def test_two_workers_share_the_port_and_stop_on_sigterm(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with service_process(database_url, log, SHOP_WORKERS="2") as (address, process):
        workers = worker_pids(process.pid)
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


def names_in(directory: Path) -> set[str] | None:
    """The files in `directory`; None when it does not exist."""
    return {p.name for p in directory.iterdir()} if directory.is_dir() else None


async def missing_users(address: str, calls: int) -> int:
    """`calls` GetUser of a user that does not exist, on a connection of its own."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        for _ in range(calls):
            failure = await rpc_fails(stub.GetUser(api.GetUserRequest(id=1), timeout=10))
            assert failure.reason == "USER_NOT_FOUND"
    return calls


async def test_two_workers_serve_one_metrics_endpoint_that_adds_them_up(
    database_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Under load from several connections, both workers serve GetUser and the parent's one
    /metrics counts every call once; the pool gauges add up both pools. The directory the
    series live in is emptied when serve starts (a second run counts from 0), and one that
    serve made itself is removed when it stops."""
    metrics_port = free_port()
    named = tmp_path / "metrics"
    named.mkdir()
    getuser_not_found = (
        "grpc_server_handled_total",
        rpc("shop.v1.UserService/GetUser", grpc_code="NOT_FOUND"),
    )
    in_flight = ("grpc_server_in_flight", rpc("shop.v1.UserService/GetUser"))
    # A directory of its own, then the operator's twice: the third run counts only its calls.
    operator = {"PROMETHEUS_MULTIPROC_DIR": str(named)}
    for run, env in enumerate(({}, operator, operator)):
        settings = {
            "SHOP_WORKERS": "2",
            "SHOP_METRICS_PORT": str(metrics_port),
            "SHOP_POOL_SIZE": "3",
        }
        log = tmp_path / f"serve-{run}.log"
        with service_process(database_url, log, **settings, **env) as (address, process):
            workers = worker_pids(process.pid)
            assert len(workers) == 2
            directory = Path(psutil.Process(min(workers)).environ()["PROMETHEUS_MULTIPROC_DIR"])
            assert names_in(directory) is not None
            calls = 0
            for _ in range(MAX_ROUNDS):
                done = await asyncio.gather(
                    *(missing_users(address, CALLS_EACH) for _ in range(CALLERS))
                )
                calls += sum(done)
                if workers <= await pids_that_served_get_user(engine):
                    break
            assert workers <= await pids_that_served_get_user(engine), log.read_text()
            # Each worker's own files: its calls were counted where the parent reads them.
            assert {f"counter_{pid}.db" for pid in workers} <= (names_in(directory) or set())

            samples = await scrape_port(metrics_port)
            assert samples.get(getuser_not_found) == calls
            assert samples.get(in_flight) == 0
            # Each worker's batches, as each last sampled them (every second): every call once.
            reads = frozenset({"batcher": "user read batch"}.items())
            for _ in range(MAX_ROUNDS):
                if samples.get(("shop_batch_requests_total", reads)) == calls:
                    break
                await asyncio.sleep(0.25)
                samples = await scrape_port(metrics_port)
            assert samples.get(("shop_batch_requests_total", reads)) == calls
            # Both pools (3 each), as each worker last sampled them (every second).
            assert samples.get(("shop_db_pool_size", frozenset())) == 6

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_TIMEOUT) == 0, log.read_text()
        if run == 0:
            assert names_in(directory) is None, "serve left the directory it made"
        else:
            # the operator's: kept (emptied at the next start)
            assert directory == named and names_in(named) is not None
