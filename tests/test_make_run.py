"""What `make run` does, with SHOP_DATABASE_URL unset: `python -m service migrate`, then
`python -m service serve`, both on the embedded PostgreSQL in SHOP_DATA_DIR. The README
promises it needs no setup, keeps its data there, and stops the database with the service."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from shop.v1 import user_service_pb2 as users_api
from shop.v1.user_service_pb2_grpc import UserServiceStub

from tests.process import (
    ROOT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    free_port,
    start_serve,
    user_env,
    wait_until_serving,
)


def embedded_env(data_dir: Path, port: int) -> dict[str, str]:
    """The caller's environment without any SHOP_* (so no SHOP_DATABASE_URL), as `make run`."""
    return user_env(
        SHOP_DATA_DIR=str(data_dir),
        SHOP_GRPC_HOST="127.0.0.1",
        SHOP_GRPC_PORT=str(port),
        SHOP_SHUTDOWN_GRACE="2",
        SHOP_SHUTDOWN_DRAIN_DELAY="0",
    )


def postmaster_pid(pgdata: Path) -> int | None:
    """The embedded server's pid while it runs (postmaster.pid's first line), else None."""
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_stopped(pgdata: Path, pid: int) -> None:
    """`pg_ctl -w stop` has finished when the service exits; a few seconds of slack for the
    postmaster's own exit to be seen."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "the embedded PostgreSQL still runs after the service stopped"
    assert postmaster_pid(pgdata) is None


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, pgdata: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m service serve` until SERVING; on a failure, kill it and its database."""
    with log.open("wb") as out:
        process = start_serve(env, out)
    try:
        wait_until_serving(f"127.0.0.1:{env['SHOP_GRPC_PORT']}", process, log)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
        if (pid := postmaster_pid(pgdata)) is not None and alive(pid):
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown: no server left behind


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_TIMEOUT * 3)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running after SIGTERM:\n{log.read_text()}")
    assert code == 0, f"serve exited with {code} after SIGTERM:\n{log.read_text()}"


def test_migrate_and_serve_from_every_core_on_the_embedded_postgres(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    pgdata = data_dir / "pg"
    port = free_port()
    env = embedded_env(data_dir, port)
    address = f"127.0.0.1:{port}"

    migrated = subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT * 3,  # initdb on a loaded machine
        check=False,
    )
    assert migrated.returncode == 0, f"migrate failed:\n{migrated.stdout}{migrated.stderr}"
    assert (pgdata / "PG_VERSION").is_file(), "no embedded PostgreSQL in SHOP_DATA_DIR"
    assert postmaster_pid(pgdata) is None, "migrate left the embedded PostgreSQL running"

    log = tmp_path / "serve.log"
    with serving(env, log, pgdata) as process:
        pid = postmaster_pid(pgdata)
        assert pid is not None and alive(pid)
        # SHOP_WORKERS unset: a worker process per core this process may use.
        workers = [
            child
            for child in psutil.Process(process.pid).children()
            if "spawn_main" in " ".join(child.cmdline())
        ]
        assert len(workers) == len(os.sched_getaffinity(0)), log.read_text()
        with grpc.insecure_channel(address) as channel:
            users = UserServiceStub(channel)
            created = users.CreateUser(
                users_api.CreateUserRequest(
                    email="embedded@example.com", first_name="Em", last_name="Bedded"
                ),
                timeout=30,
            )
            assert created.id > 0
            assert users.GetUser(users_api.GetUserRequest(id=created.id), timeout=30) == created
        stop(process, log)
    assert_stopped(pgdata, pid)

    # The data stays in SHOP_DATA_DIR: served again, the user is there.
    log = tmp_path / "serve-again.log"
    with serving(env, log, pgdata) as process:
        pid = postmaster_pid(pgdata)
        assert pid is not None
        with grpc.insecure_channel(address) as channel:
            fetched = UserServiceStub(channel).GetUser(
                users_api.GetUserRequest(id=created.id), timeout=30
            )
            assert fetched == created
        stop(process, log)
    assert_stopped(pgdata, pid)
