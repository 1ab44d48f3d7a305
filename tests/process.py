"""`python -m service serve` as a real process for a test: on a free port, against the test
database (already migrated by the session fixture), its output in a log file; killed if the test
leaves it running. Built on tests/test_cli.py's helpers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.test_cli import ROOT, STOP_TIMEOUT, free_port, service_env, wait_until_serving


@contextmanager
def service_process(
    database_url: str, log: Path, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yields (address, process) once health says SERVING; `env` adds SHOP_* variables."""
    port = free_port()
    environment = service_env(database_url, port) | env
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_until_serving(address, process, log)
        yield address, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
