"""A two-node Patroni cluster on this machine: one etcd, two PostgreSQL nodes (primary and
synchronous standby) in a temporary directory on free local ports.

    python -m deploy.patroni.cluster             start it, print the multi-host URL, wait
    python -m deploy.patroni.cluster --serve     also migrate and serve shop-service on it
                                                 (`make run-ha`)

Ctrl-C or SIGTERM stops everything it started. tests/ha/ starts the same cluster through
`patroni_cluster()`. Debian's patroni (3.0.2) and etcd-server (3.4) and PostgreSQL's binaries
(/usr/lib/postgresql/*/bin) do the work: nothing here replicates or fails over by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from deploy.processes import free_port, start_serve, stop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATE = HERE / "node.yml.template"
SCOPE = "shop"
# The leader key's life: how long a Patroni that died (or its machine) keeps the lock. A
# crashed postmaster under a live Patroni fails over sooner (primary_start_timeout: 0).
TTL = 10
LOOP_WAIT = 1
RETRY_TIMEOUT = 4
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


def bin_dir() -> Path:
    """The newest PostgreSQL server binaries Debian installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    if not found:
        raise RuntimeError("no /usr/lib/postgresql/*/bin/pg_ctl: install Debian's postgresql-15")
    return found[0].parent


def executable(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if path is None:
        raise RuntimeError(f"{name} not found: install Debian's patroni and etcd-server")
    return path


@dataclass
class Node:
    """One Patroni node: its PostgreSQL port, REST API port and directories."""

    name: str
    pg_port: int
    api_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "patroni.log"

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid in its data directory, if it runs."""
        with suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        return None


@dataclass
class Cluster:
    """etcd and the nodes it started; `url()` is what shop-service connects with."""

    root: Path
    etcd_port: int
    nodes: list[Node]
    database: str = "shop"
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, database: str | None = None) -> str:
        """The multi-host URL in the form SQLAlchemy documents for asyncpg: asyncpg tries the
        hosts in turn and keeps the one that accepts writes."""
        hosts = "&".join(f"host=127.0.0.1:{node.pg_port}" for node in self.nodes)
        name = database or self.database
        return f"postgresql+asyncpg://postgres@/{name}?{hosts}&target_session_attrs=read-write"

    def node_url(self, node: Node, database: str | None = None) -> str:
        """One node only (to read what a given server holds)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{node.pg_port}/{database or self.database}"

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view (GET /cluster) from the first node whose REST API answers."""
        for node in self.nodes:
            with suppress(OSError, ValueError):
                reply = _get_json(f"http://127.0.0.1:{node.api_port}/cluster")
                return list(reply.get("members", []))
        return []

    def roles(self) -> dict[str, tuple[str, str]]:
        """name -> (role, state), e.g. {"node1": ("leader", "running"), "node2":
        ("sync_standby", "streaming")}."""
        return {m["name"]: (m.get("role", ""), m.get("state", "")) for m in self.members()}

    def leader(self) -> Node | None:
        """The node whose Patroni holds the leader lock and whose PostgreSQL runs."""
        for name, (role, state) in self.roles().items():
            if role == "leader" and state == "running":
                return self.node(name)
        return None

    def sync_standby(self) -> Node | None:
        for name, (role, state) in self.roles().items():
            if role == "sync_standby" and state in ("streaming", "running"):
                return self.node(name)
        return None

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def wait_leader(self, timeout: float = READY_TIMEOUT) -> Node:
        deadline = time.monotonic() + timeout
        while (leader := self.leader()) is None:
            self.check_running()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader after {timeout:.0f}s: {self.roles()}")
            time.sleep(0.2)
        return leader

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> tuple[Node, Node]:
        """Until there is a leader and a synchronous standby: (leader, standby)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            leader, standby = self.leader(), self.sync_standby()
            if leader is not None and standby is not None:
                return leader, standby
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no leader and sync standby after {timeout:.0f}s: {self.roles()}"
                )
            time.sleep(0.2)

    def check_running(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                logs = "\n".join(f"--- {n.log}:\n{_tail(n.log)}" for n in self.nodes)
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}\n{logs}")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as reply:
        value = json.loads(reply.read())
    return value if isinstance(value, dict) else {}


def _tail(path: Path, lines: int = 40) -> str:
    with suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def render(node: Node, etcd_port: int, parameters: Mapping[str, str] | None = None) -> str:
    """node.yml.template with this node's values."""
    extra = "".join(
        f"    {key}: {json.dumps(value)}\n" for key, value in (parameters or {}).items()
    )
    return Template(TEMPLATE.read_text()).substitute(
        scope=SCOPE,
        name=node.name,
        api_port=node.api_port,
        pg_port=node.pg_port,
        etcd_port=etcd_port,
        ttl=TTL,
        loop_wait=LOOP_WAIT,
        retry_timeout=RETRY_TIMEOUT,
        data_dir=node.data_dir,
        node_dir=node.directory,
        bin_dir=bin_dir(),
        extra_parameters=extra.rstrip("\n"),
    )


class _Launcher:
    """Starts processes as the `postgres` OS user when we are root (PostgreSQL refuses to run
    as root), in directories that user owns."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.as_postgres = os.geteuid() == 0

    def own(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            shutil.chown(path, "postgres", "postgres")
        return path

    def start(self, command: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        user: dict[str, Any] = {}
        if self.as_postgres:
            user = {"user": "postgres", "group": "postgres", "extra_groups": []}
            env["HOME"] = str(self.root)
        with log.open("ab") as out:
            return subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop them
                **user,
            )


def _start_etcd(launcher: _Launcher, root: Path) -> tuple[int, subprocess.Popen[bytes]]:
    client, peer = free_port(), free_port()
    directory = launcher.own(root / "etcd")
    process = launcher.start(
        [
            executable("etcd"),
            "--name=etcd0",
            f"--data-dir={directory / 'data'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=etcd0=http://127.0.0.1:{peer}",
            "--initial-cluster-state=new",
        ],
        directory / "etcd.log",
    )
    deadline = time.monotonic() + 30
    while True:
        with suppress(OSError, ValueError):
            if _get_json(f"http://127.0.0.1:{client}/health").get("health") == "true":
                return client, process
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"etcd did not start:\n{_tail(directory / 'etcd.log')}")
        time.sleep(0.1)


def _kill_postmaster(node: Node) -> None:
    """A postmaster left behind by a Patroni that was killed: stop it immediately."""
    pid = node.postmaster_pid()
    if pid is not None:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGQUIT)


@contextmanager
def patroni_cluster(
    root: Path | None = None,
    parameters: Mapping[str, str] | None = None,
    database: str = "shop",
) -> Iterator[Cluster]:
    """etcd plus two Patroni nodes, ready (leader and sync standby) and with `database`
    created; everything stopped and deleted on the way out. `parameters` adds PostgreSQL
    settings (the tests turn fsync off)."""
    with ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shop-ha-")))
        launcher = _Launcher(root)
        launcher.own(root).chmod(0o755)
        etcd_port, etcd = _start_etcd(launcher, root)
        stack.callback(stop, [etcd], STOP_TIMEOUT)
        nodes = [
            Node(f"node{n}", free_port(), free_port(), launcher.own(root / f"node{n}"))
            for n in (1, 2)
        ]
        cluster = Cluster(root, etcd_port, nodes, database, [etcd])
        for node in nodes:
            config = node.directory / "patroni.yml"
            config.write_text(render(node, etcd_port, parameters))
            node.process = launcher.start([executable("patroni"), str(config)], node.log)
            cluster.processes.append(node.process)
            stack.callback(_kill_postmaster, node)
            stack.callback(stop, [node.process], STOP_TIMEOUT)
            if node is nodes[0]:
                cluster.wait_leader()  # the first bootstraps; the second copies it
        cluster.wait_ready()
        create_database(cluster)
        yield cluster


def create_database(cluster: Cluster) -> None:
    """CREATE DATABASE on the leader unless it exists (psql from the same binaries)."""
    leader = cluster.wait_leader()
    psql = [str(bin_dir() / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(leader.pg_port)]
    psql += ["-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc"]
    name = cluster.database
    exists = subprocess.run(
        [*psql, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not exists:
        subprocess.run([*psql, f'CREATE DATABASE "{name}"'], check=True, capture_output=True)


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: unwind and stop everything."""


_signalled: list[int] = []


def _on_signal(signum: int, _frame: object) -> None:
    # Only the first: a second Ctrl-C must not cut short the stopping of what we started.
    if not _signalled:
        _signalled.append(signum)
        raise Stopped(signal.Signals(signum).name)


def _serve(url: str) -> int:
    """`python -m service migrate`, then `serve` until it exits or we are told to stop."""
    env = {**os.environ, "SHOP_DATABASE_URL": url}
    subprocess.run([sys.executable, "-m", "service", "migrate"], cwd=ROOT, env=env, check=True)
    server = start_serve(env)
    try:
        return server.wait()
    except Stopped as stopped:
        _say(f"{stopped}: stopping the service")
        # A terminal's Ctrl-C reached the server too (same process group); SIGTERM does not.
        with suppress(ProcessLookupError):
            server.terminate()
        server.wait()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.patroni.cluster", description=__doc__)
    parser.add_argument("--serve", action="store_true", help="migrate and serve shop-service")
    parser.add_argument("--root", type=Path, help="keep the cluster here (default: a temp dir)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    status = 0
    try:
        with patroni_cluster(args.root) as cluster:
            try:
                status = _run(cluster, args.serve)
            except Stopped as stopped:
                # Said before the nodes stop (their PostgreSQL checkpoints: seconds), not after.
                _say(f"{stopped}: stopping Patroni and etcd")
    except Stopped as stopped:
        _say(f"{stopped} while starting: stopped what had started")
    _say("stopped")
    return status


def _run(cluster: Cluster, serve: bool) -> int:
    leader, _ = cluster.wait_ready()
    print(f"etcd:          127.0.0.1:{cluster.etcd_port}", flush=True)
    for node in cluster.nodes:
        role = "leader" if node is leader else "sync standby"
        print(
            f"{node.name}:         127.0.0.1:{node.pg_port} ({role}), "
            f"Patroni API 127.0.0.1:{node.api_port}, log {node.log}",
            flush=True,
        )
    print(f"SHOP_DATABASE_URL={cluster.url()}", flush=True)
    if serve:
        return _serve(cluster.url())
    print("Ctrl-C stops the cluster.", flush=True)
    while True:
        time.sleep(1)
        cluster.check_running()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
