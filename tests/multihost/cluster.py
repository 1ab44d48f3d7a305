"""The pieces the multi-host tests run: a service replica inside a namespace, and Envoy on the
host in front of them, with its admin endpoint read for what Envoy thinks of each replica."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from deploy.envoy.admin import EnvoyAdmin
from deploy.envoy.config import render
from deploy.processes import serve_argv, stop
from tests import tools
from tests.multihost.hosts import Host
from tests.process import ROOT, free_port, service_env, wait_until_serving

PORT = 50051  # each namespace has a port space of its own
METRICS_PORT = 9464
# Long enough for Envoy's 1 s health check to see NOT_SERVING before the listener closes.
DRAIN_DELAY = 2.0
GRACE = 5.0
# One per run, shared by every replica: a resume token from one is good on another, and a
# replica beyond loopback refuses the development secret.
PAGE_TOKEN_SECRET = secrets.token_urlsafe(32)


@dataclass
class Replica:
    """`python -m service serve` inside one namespace, on its address."""

    host: Host
    database_url: str
    logs: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{self.host.address}:{PORT}"

    def env(self) -> dict[str, str]:
        return service_env(self.database_url, PORT) | {
            "SHOP_GRPC_HOST": self.host.address,
            # No tokens (and plain text) between Envoy and the replicas on the test's own bridge.
            "SHOP_ALLOW_INSECURE": "true",
            "SHOP_SHUTDOWN_DRAIN_DELAY": str(DRAIN_DELAY),
            "SHOP_SHUTDOWN_GRACE": str(GRACE),
            "SHOP_PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,
            "SHOP_POOL_SIZE": "4",
            "SHOP_MAX_OVERFLOW": "4",
            "SHOP_HEALTH_INTERVAL": "0.5",
            "SHOP_LOG_LEVEL": "WARNING",
            "SHOP_METRICS_HOST": self.host.address,
            "SHOP_METRICS_PORT": str(METRICS_PORT),
        }

    def start(self) -> None:
        self.starts += 1
        log = self.log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                self.host.command(*serve_argv()),
                cwd=ROOT,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def log(self) -> Path:
        return self.logs / f"{self.host.netns}.log"

    def in_flight(self, method: str) -> int:
        """Calls of `method` (a bare name: "StreamUsers") this replica is serving now, read
        from its own /metrics (grpc_server_in_flight)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://{self.host.address}:{METRICS_PORT}/metrics"
        with opener.open(url, timeout=2) as response:
            lines = response.read().decode().splitlines()
        label = f'grpc_method="{method}"'
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in lines
            if line.startswith("grpc_server_in_flight{") and label in line
        )

    async def until_in_flight(self, method: str, within: float) -> bool:
        """Wait (bounded) until this replica serves at least one call of `method`."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.in_flight, method) > 0:
                return True
            await asyncio.sleep(0.1)
        return False

    def wait_serving(self) -> None:
        assert self.process is not None
        wait_until_serving(self.address, self.process, self.log)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class Envoy:
    """Envoy on the host: the front door on loopback, its admin endpoint beside it."""

    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path
    upstreams: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin(self) -> EnvoyAdmin:
        return EnvoyAdmin("127.0.0.1", self.admin_port)

    def health_flags(self) -> dict[str, str]:
        return self.admin.health_flags()

    def stats(self, pattern: str) -> dict[str, int]:
        return self.admin.stats(pattern)

    def wait_for(self, upstream: str, healthy: bool, timeout: float = 30.0) -> float:
        """Poll /clusters until `upstream` is (or is no longer) healthy; the seconds it took."""
        started = time.monotonic()
        while True:
            flags = self.health_flags().get(upstream, "")
            if (flags == "healthy") == healthy:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{upstream} still {flags!r} after {timeout:.0f}s")
            time.sleep(0.05)

    async def until(self, upstream: str, healthy: bool, within: float = 30.0) -> float:
        return await asyncio.to_thread(self.wait_for, upstream, healthy, within)


@contextmanager
def envoy_in_front(replicas: list[Replica], logs: Path) -> Iterator[Envoy]:
    """Envoy listening on 127.0.0.1 with the replicas as one cluster; all healthy on yield."""
    binary = tools.require(tools.ENVOY)
    port, admin_port = free_port(), free_port()
    endpoints = [(r.host.address, PORT) for r in replicas]
    config = logs / "envoy.yaml"
    config.write_text(render(endpoints, listen_port=port, admin_port=admin_port))
    log = logs / "envoy.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    envoy = Envoy(process, port, admin_port, log, [r.address for r in replicas])
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"envoy exited with {process.returncode}:\n{log.read_text()}")
            try:
                if all(envoy.health_flags().get(u) == "healthy" for u in envoy.upstreams):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"envoy's upstreams not healthy: {envoy.health_flags()}")
            time.sleep(0.1)
        yield envoy
    finally:
        stop([process], 10)
