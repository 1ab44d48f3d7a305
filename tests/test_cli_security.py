"""`python -m service serve` as a process: refuses bad security settings (status 2, one line
naming the variable, before any database), warns when auth is off or the development page-token
secret is in use, writes JSON access lines with the request id, and never writes a token to its
log."""

from __future__ import annotations

import json
import secrets
import signal
import uuid
from pathlib import Path

import grpc
import pytest
from shop.v1 import user_service_pb2 as api
from shop.v1.user_service_pb2_grpc import UserServiceStub

from tests.process import STOP_TIMEOUT, free_port, serve_once, service_env, service_process

TOKEN = "pr0cess-t0ken-5ecret"


PAGE_SECRET = secrets.token_urlsafe(32)
AUTH_OFF_WARNING = "SHOP_AUTH_TOKENS is unset: every caller may read and write"
DEV_SECRET_WARNING = "the development page-token secret is in use"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        # Values with no token:role pair, or a malformed one: refused on any host.
        ({"SHOP_AUTH_TOKENS": ","}, "SHOP_AUTH_TOKENS"),
        ({"SHOP_AUTH_TOKENS": " , "}, "SHOP_AUTH_TOKENS"),
        ({"SHOP_AUTH_TOKENS": TOKEN}, "SHOP_AUTH_TOKENS"),
        ({"SHOP_AUTH_TOKENS": f"{TOKEN}:admin"}, "SHOP_AUTH_TOKENS"),
        ({"SHOP_AUTH_TOKENS": ":read"}, "SHOP_AUTH_TOKENS"),
        # No tokens (unset or blank: the same thing) on a non-loopback host.
        ({}, "SHOP_AUTH_TOKENS"),
        ({"SHOP_AUTH_TOKENS": ""}, "SHOP_AUTH_TOKENS"),
        # The development page-token secret beyond loopback; SHOP_ALLOW_INSECURE opts out of
        # tokens, not out of a secret of one's own.
        (
            {"SHOP_AUTH_TOKENS": f"{TOKEN}:read", "SHOP_PAGE_TOKEN_SECRET": None},
            "SHOP_PAGE_TOKEN_SECRET",
        ),
        ({"SHOP_ALLOW_INSECURE": "true", "SHOP_PAGE_TOKEN_SECRET": None}, "SHOP_PAGE_TOKEN_SECRET"),
        (
            {"SHOP_AUTH_TOKENS": f"{TOKEN}:read", "SHOP_PAGE_TOKEN_SECRET": ""},
            "SHOP_PAGE_TOKEN_SECRET",
        ),
    ],
    ids=[
        "comma",
        "blank-pairs",
        "no-role",
        "unknown-role",
        "no-token",
        "tokens-unset",
        "tokens-empty",
        "dev-secret",
        "dev-secret-allow-insecure",
        "empty-secret",
    ],
)
def test_serve_refuses_bad_security_settings_with_status_2(
    database_url: str, env: dict[str, str | None], variable: str
) -> None:
    """On 0.0.0.0 with everything else right; the database URL is real, so a wrong pass would
    serve (and time out) rather than hang on a missing database."""
    environment = service_env(database_url, free_port()) | {
        "SHOP_GRPC_HOST": "0.0.0.0",
        "SHOP_PAGE_TOKEN_SECRET": PAGE_SECRET,
    }
    for name, value in env.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    done = serve_once(environment, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    [line] = output.splitlines()
    assert variable in line
    assert "Traceback" not in output
    assert TOKEN not in output
    assert PAGE_SECRET not in output


@pytest.mark.parametrize(
    ("env", "metadata", "warned", "not_warned"),
    [
        (
            {"SHOP_AUTH_TOKENS": "", "SHOP_PAGE_TOKEN_SECRET": PAGE_SECRET},
            (),
            AUTH_OFF_WARNING,
            DEV_SECRET_WARNING,
        ),
        (
            {"SHOP_AUTH_TOKENS": f"{TOKEN}:write"},
            (("authorization", f"Bearer {TOKEN}"),),
            DEV_SECRET_WARNING,
            AUTH_OFF_WARNING,
        ),
    ],
    ids=["tokens-empty", "dev-secret"],
)
def test_loopback_serves_and_warns(
    database_url: str,
    tmp_path: Path,
    env: dict[str, str],
    metadata: tuple[tuple[str, str], ...],
    warned: str,
    not_warned: str,
) -> None:
    """Empty SHOP_AUTH_TOKENS is auth off (a call without a token writes), the development
    secret is allowed on loopback; each says so at start, and only that one."""
    log = tmp_path / "serve.log"
    with service_process(database_url, log, **env) as (address, process):
        with grpc.insecure_channel(address) as channel:
            request = api.CreateUserRequest(
                email=f"{uuid.uuid4().hex}@example.com", first_name="Lo", last_name="Op"
            )
            created = UserServiceStub(channel).CreateUser(request, metadata=metadata, timeout=30)
            assert created.id > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT) == 0

    warnings = [line for line in log.read_text().splitlines() if "WARNING" in line]
    assert [line for line in warnings if warned in line] != []
    assert [line for line in warnings if not_warned in line] == []


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
