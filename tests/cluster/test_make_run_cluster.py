"""`make run-cluster` as a user runs it: REPLICAS replicas and Envoy on the embedded PostgreSQL
(SHOP_DATABASE_URL unset), answering curl on SHOP_ENVOY_PORT; SIGTERM stops every process it
started, the database included."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests import tools
from tests.cluster.curl import curl
from tests.process import free_port, make_target, user_env

pytestmark = pytest.mark.requires(tools.ENVOY, tools.CURL)

READY_LINE = "Ctrl-C or SIGTERM stops them all."
START_TIMEOUT = 180.0  # initdb, migrations, two replicas, Envoy's first health checks
STOP_TIMEOUT = 60.0


def two_free_ports() -> int:
    """A port p with p and p+1 free now: the replicas take SHOP_GRPC_PORT+i."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


def wait_for_line(process: subprocess.Popen[bytes], log: Path, line: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while line not in log.read_text():
        if process.poll() is not None:
            pytest.fail(f"make run-cluster exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not ready after {START_TIMEOUT:.0f}s:\n{log.read_text()}")
        time.sleep(0.3)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """SHOP_DATA_DIR in a folder the embedded server's own user can enter when we are root
    (pytest's tmp_path is 0700), as tests/postgres.py does."""
    with tempfile.TemporaryDirectory(prefix="shop-run-cluster-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp) / "data"


def test_make_run_cluster_serves_json_and_stops_everything_on_sigterm(
    tmp_path: Path, data_dir: Path
) -> None:
    envoy_port = free_port()
    env = user_env(
        SHOP_DATA_DIR=str(data_dir),
        SHOP_GRPC_PORT=str(two_free_ports()),
        SHOP_METRICS_PORT="0",
        SHOP_ENVOY_PORT=str(envoy_port),
        SHOP_ENVOY_ADMIN_PORT=str(free_port()),
        SHOP_SHUTDOWN_DRAIN_DELAY="1",
        SHOP_SHUTDOWN_GRACE="2",
    )
    log = tmp_path / "run-cluster.log"
    make = make_target(["run-cluster", "REPLICAS=2"], env, log)
    started: list[psutil.Process] = []
    postmaster: int | None = None
    try:
        wait_for_line(make, log, READY_LINE)
        started = psutil.Process(make.pid).children(recursive=True)
        postmaster = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        assert sum("envoy" in p.name() for p in started) == 1, started
        assert sum("serve" in p.cmdline() for p in started) == 2, started

        reply = curl(f"http://127.0.0.1:{envoy_port}/v1/users")
        assert reply.status == 200, (reply, log.read_text())
        assert reply.json() == {"users": [], "nextPageToken": ""}

        make.send_signal(signal.SIGTERM)  # make passes it on to the launcher and waits
        make.wait(timeout=STOP_TIMEOUT)
    finally:
        if make.poll() is None:
            for process in psutil.Process(make.pid).children(recursive=True):
                process.kill()
            make.kill()
            make.wait()
    text = log.read_text()
    assert "stopped" in text.splitlines(), text  # the launcher's last word after a clean stop
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"left running: {alive}"
    assert postmaster is not None and not running(postmaster), "PostgreSQL still runs"


def running(pid: int) -> bool:
    """Alive and not a zombie (the daemonized postmaster's parent may be an init that does not
    reap)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
