"""`python -m service serve` as a process: refuses an open non-loopback bind, writes JSON access
lines with the request id, and never writes a token to its log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from shop.v1 import user_service_pb2 as api
from shop.v1.user_service_pb2_grpc import UserServiceStub

from tests.process import ROOT, STOP_TIMEOUT, free_port, service_env, service_process

TOKEN = "pr0cess-t0ken-5ecret"


def test_serve_exits_non_zero_on_an_open_non_loopback_address(database_url: str) -> None:
    env = service_env(database_url, free_port()) | {"SHOP_GRPC_HOST": "0.0.0.0"}
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "SHOP_ALLOW_INSECURE" in done.stderr


def test_json_access_lines_carry_request_id_and_no_token(database_url: str, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    extra = {"SHOP_LOG_FORMAT": "json", "SHOP_AUTH_TOKENS": f"{TOKEN}:read"}
    with service_process(database_url, log, **extra) as (address, process):
        with grpc.insecure_channel(address) as channel:
            stub = UserServiceStub(channel)
            metadata = [("authorization", f"Bearer {TOKEN}"), ("x-request-id", "cli-req-1")]
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetUser(api.GetUserRequest(id=424242), metadata=metadata, timeout=30)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT) == 0

    text = log.read_text()
    assert TOKEN not in text  # not in the settings dump, not in any access line
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    [access] = [e for e in entries if e.get("method") == "/shop.v1.UserService/GetUser"]
    assert access["logger"] == "service.access"
    assert access["request_id"] == "cli-req-1"
    assert access["code"] == "NOT_FOUND"
    assert access["peer"].startswith("ipv4:127.0.0.1:")
    assert any("settings" in e["message"] for e in entries)
