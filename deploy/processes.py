"""What the launchers (and the tests and benchmarks that start servers) need of processes and
ports: one way to start `python -m service serve`, from an environment without the caller's
SHOP_* settings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port on 127.0.0.1 free right now, for servers that cannot be given port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM all at once, wait up to `timeout`, then SIGKILL what is left."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def without_shop_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`environ` (this process's own by default) minus every SHOP_*: a server started from it
    runs with the defaults plus what its launcher sets, whatever the shell had exported."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if not k.startswith("SHOP_")}


def serve_argv(*python_options: str) -> list[str]:
    """`python -m service serve` under this interpreter; `python_options` (a profiler's
    `-m cProfile -o FILE`) go before the module."""
    return [sys.executable, *python_options, "-m", "service", "serve"]


def start_serve(
    env: Mapping[str, str], output: IO[bytes] | None = None, *python_options: str
) -> subprocess.Popen[bytes]:
    """`serve` from the repository root with exactly `env`; stdout and stderr to `output`
    (inherited without one)."""
    return subprocess.Popen(
        serve_argv(*python_options),
        cwd=ROOT,
        env=dict(env),
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
    )


def serving(address: str, timeout: float = 1.0) -> bool:
    """Whether a server's health Check at `address` answers SERVING within `timeout` seconds: the
    one probe that every start (make run-cluster, the image smoke, the tests) polls."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
