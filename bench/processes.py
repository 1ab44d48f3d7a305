"""Servers under test as real subprocesses: the service (`python -m service serve`) and the
echo baseline; their readiness, their resident memory, and a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families

from deploy.processes import ROOT as ROOT  # re-exported for bench's other modules
from deploy.processes import free_port, serve_argv, without_shop_settings


def run_migrations(database_url: str) -> None:
    """`python -m service migrate` on the bench database, as an operator would."""
    env = {
        **without_shop_settings(),
        "SHOP_DATABASE_URL": database_url,
        "SHOP_LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "service", "migrate"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"migrate failed ({done.returncode}):\n{done.stdout}{done.stderr}")


class ServerProcess:
    """A server subprocess listening on 127.0.0.1:port; its output goes to a temp log."""

    def __init__(
        self, argv: list[str], port: int, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.port = port
        metrics = (env or {}).get("SHOP_METRICS_PORT")
        self.metrics_port = int(metrics) if metrics else None
        self.target = f"127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="shop-bench-server-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**without_shop_settings(), **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @classmethod
    def service(
        cls,
        database_url: str,
        extra_env: dict[str, str] | None = None,
        profile: Path | None = None,
        cwd: Path = ROOT,
    ) -> ServerProcess:
        """`python -m service serve`; under cProfile (written on a clean stop) with `profile`."""
        port = free_port()
        env = {
            "SHOP_DATABASE_URL": database_url,
            "SHOP_GRPC_PORT": str(port),
            # Logging every call would measure the log handler, not the service.
            "SHOP_LOG_LEVEL": "WARNING",
            "SHOP_SHUTDOWN_DRAIN_DELAY": "0",  # no balancer to tell: stop at once
            # One process unless a suite asks for more: its figures are per process, and the
            # workers suite sets SHOP_WORKERS itself.
            "SHOP_WORKERS": "1",
            # Metrics on, as a deployment runs: their cost is in the figures, and the batch
            # counters tell how many calls a batch served (batch_counts).
            "SHOP_METRICS_PORT": str(free_port()),
            **(extra_env or {}),
        }
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
        return cls(serve_argv(*profiler), port, env, cwd)

    @classmethod
    def echo(cls) -> ServerProcess:
        port = free_port()
        return cls([sys.executable, "-m", "bench.echo", str(port)], port)

    async def wait_ready(self, within: float = 60.0) -> None:
        """Until the port answers; fails early, with the log, if the process exits."""
        deadline = time.monotonic() + within
        async with grpc.aio.insecure_channel(self.target) as channel:
            while True:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise RuntimeError(f"server exited ({code}):\n{self.log_tail()}")
                try:
                    await asyncio.wait_for(channel.channel_ready(), 0.5)
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"server not ready:\n{self.log_tail()}") from None

    def _processes(self) -> list[psutil.Process]:
        """The server and its children (SHOP_WORKERS starts them); empty once it has exited."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _total(self, measure: Callable[[psutil.Process], float]) -> float:
        total = 0.0
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += measure(proc)
        return total

    def rss(self) -> int:
        """Resident bytes of the server and its children."""
        return int(self._total(lambda proc: proc.memory_info().rss))

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server and its children so far."""
        return self._total(lambda proc: proc.cpu_times().user + proc.cpu_times().system)

    def batch_counts(self, batcher: str) -> tuple[float, float]:
        """(batches, requests) `batcher` has run so far, from the service's /metrics (with
        several workers, as each last sampled them, once a second); (0, 0) without metrics."""
        if self.metrics_port is None:
            return 0.0, 0.0
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        counts = {"shop_batches_total": 0.0, "shop_batch_requests_total": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in counts and sample.labels.get("batcher") == batcher:
                    counts[sample.name] += sample.value
        return counts["shop_batches_total"], counts["shop_batch_requests_total"]

    def log_tail(self, lines: int = 30) -> str:
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (the service drains gracefully), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
