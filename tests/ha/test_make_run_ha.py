"""`make run-ha` as a user runs it: etcd and two Patroni nodes (a leader and a synchronous
standby) in a temporary directory, migrated, and the service serving on the multi-host URL; a
call writes and reads through it; SIGTERM to make (what make passes on, as for `make run` under
a supervisor) stops the service, both Patroni nodes with their PostgreSQL, and etcd, and the
directory is gone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import grpc
import psutil
import pytest
from shop.v1 import user_service_pb2 as users_api
from shop.v1.user_service_pb2_grpc import UserServiceStub

from tests import tools
from tests.process import free_port, make_target, user_env, wait_until_serving

pytestmark = pytest.mark.requires(tools.PATRONI, tools.ETCD, tools.POSTGRES_SERVER)

# The launcher's lines once both nodes are up (deploy/patroni/cluster.py, docs/scale-out.md).
NODE_LINE = re.compile(
    r"^(node\d): +127\.0\.0\.1:(\d+) \((leader|sync standby)\), "
    r"Patroni API 127\.0\.0\.1:(\d+), log (\S+)/node\d/patroni\.log$",
    re.MULTILINE,
)
URL_LINE = "SHOP_DATABASE_URL="
READY_TIMEOUT = 45.0  # etcd, initdb, the standby's base backup, then migrate and serve
STOP_TIMEOUT = 30.0  # the service's grace, then each Patroni stops its PostgreSQL


@pytest.fixture
def tmpdir_root() -> Iterator[Path]:
    """TMPDIR for the launcher, so its temporary cluster directory is this test's to find; one
    that the `postgres` user can enter when we are root (pytest's tmp_path is 0700)."""
    with tempfile.TemporaryDirectory(prefix="shop-run-ha-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


def wait_for_cluster(make: subprocess.Popen[bytes], log: Path, deadline: float) -> str:
    """The launcher's output up to the URL line (the cluster is ready then)."""
    while URL_LINE not in (text := log.read_text()):
        if make.poll() is not None:
            pytest.fail(f"make run-ha exited with {make.returncode}:\n{text}")
        if time.monotonic() > deadline:
            pytest.fail(f"no cluster after {READY_TIMEOUT:.0f}s:\n{text}")
        time.sleep(0.2)
    return text


def cluster_roles(api_port: int) -> dict[str, str]:
    """name -> "role/state" from a node's Patroni REST API (GET /cluster)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/cluster", timeout=5) as reply:
        members = json.loads(reply.read())["members"]
    return {m["name"]: f"{m['role']}/{m['state']}" for m in members}


def started_by(make: subprocess.Popen[bytes], root: Path) -> list[psutil.Process]:
    """Every process the target started: make's descendants (the launcher, etcd, Patroni, the
    service) and whatever names the cluster directory (the postmasters and their backends,
    which Patroni daemonizes away from its own tree)."""
    found = {p.pid: p for p in psutil.Process(make.pid).children(recursive=True)}
    for process in psutil.process_iter(["cmdline"]):
        if any(str(root) in part for part in process.info["cmdline"] or ()):
            found[process.pid] = process
            with suppress(psutil.Error):
                found.update((c.pid, c) for c in process.children(recursive=True))
    return list(found.values())


def names(processes: list[psutil.Process]) -> list[str]:
    described = []
    for process in processes:
        try:
            described.append(" ".join(process.cmdline())[:120])
        except psutil.Error:
            continue
    return described


def test_make_run_ha_serves_on_the_cluster_and_stops_everything_on_sigterm(
    tmp_path: Path, tmpdir_root: Path
) -> None:
    port = free_port()
    env = user_env(
        TMPDIR=str(tmpdir_root),
        SHOP_GRPC_HOST="127.0.0.1",
        SHOP_GRPC_PORT=str(port),
        SHOP_METRICS_PORT="0",
        SHOP_SHUTDOWN_DRAIN_DELAY="0",
        SHOP_SHUTDOWN_GRACE="2",
    )
    log = tmp_path / "run-ha.log"
    deadline = time.monotonic() + READY_TIMEOUT
    make = make_target(["run-ha"], env, log)
    started: list[psutil.Process] = []
    root: Path | None = None
    try:
        text = wait_for_cluster(make, log, deadline)
        nodes = {m[0]: m for m in NODE_LINE.findall(text)}
        assert sorted(nodes) == ["node1", "node2"], text
        assert sorted(m[2] for m in nodes.values()) == ["leader", "sync standby"], text
        root = Path(nodes["node1"][4])
        assert root.parent == tmpdir_root and root.is_dir(), text
        pg_ports = [int(m[1]) for m in nodes.values()]
        url = text.split(URL_LINE, 1)[1].splitlines()[0]
        assert all(f"host=127.0.0.1:{p}" in url for p in pg_ports), url
        assert url.endswith("target_session_attrs=read-write"), url

        # migrate, then serve: bounded by what is left of the same deadline
        wait_until_serving(f"127.0.0.1:{port}", make, log)
        assert time.monotonic() < deadline, f"serving only after {READY_TIMEOUT:.0f}s"

        # Patroni's own view: one leader, one synchronous standby that streams
        # (3.0.2 says "running" for a standby that streams; later versions "streaming")
        roles = sorted(cluster_roles(int(nodes["node1"][3])).values())
        assert roles[0] == "leader/running", roles
        assert roles[1] in ("sync_standby/running", "sync_standby/streaming"), roles

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = UserServiceStub(channel)
            created = users.CreateUser(
                users_api.CreateUserRequest(email="ha@example.com", first_name="H", last_name="A"),
                timeout=10,
            )
            assert created.id > 0
            assert users.GetUser(users_api.GetUserRequest(id=created.id), timeout=10) == created

        started = started_by(make, root)
        commands = names(started)
        assert sum(c.split()[0].endswith("/etcd") for c in commands) == 1, commands
        assert sum("/patroni " in c for c in commands) == 2, commands
        assert sum("/bin/postgres -D " in c for c in commands) == 2, commands
        assert sum(c.endswith("-m service serve") for c in commands) == 1, commands

        stopping = time.monotonic()
        make.send_signal(signal.SIGTERM)  # make passes it on to the launcher and waits
        make.wait(timeout=STOP_TIMEOUT)
        stopped_in = time.monotonic() - stopping
    finally:
        if make.poll() is None:  # the test failed: stop it all the same, then kill leftovers
            leftovers = started_by(make, root) if root is not None else started
            make.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                make.wait(timeout=STOP_TIMEOUT)
            for process in leftovers:
                with suppress(psutil.Error):
                    process.kill()
            make.kill()
            make.wait()
    text = log.read_text()
    said = [line for line in text.splitlines() if not line[:4].isdigit()]  # not the service's log
    assert said[-3:] == [
        "SIGTERM: stopping the service",
        "SIGTERM: stopping Patroni and etcd",
        "stopped",
    ], text
    _, alive = psutil.wait_procs(started, timeout=5)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {names(alive)}\n{text}"
    assert root is not None and not root.exists(), f"{root} still there"
    print(f"make run-ha stopped in {stopped_in:.1f}s after SIGTERM")
