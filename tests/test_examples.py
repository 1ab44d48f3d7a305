"""The clients in examples/ against a real `python -m service serve` process: the Node.js client
(@grpc/grpc-js, protos loaded at run time) and the grpcurl tour script. Both must run in CI:
a missing node, node_modules or grpcurl fails them there and skips them only on a developer
machine (CI unset): tests/tools.py. `make test` runs `npm ci --prefix examples/node` when node
is on PATH."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import tools
from tests.process import GRPCURL, ROOT, service_process

NODE_DIR = ROOT / "examples" / "node"
RUN_TIMEOUT = 120


@pytest.fixture
def address(database_url: str, tmp_path: Path) -> Iterator[str]:
    with service_process(database_url, tmp_path / "serve.log") as (address, _process):
        yield address


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


@pytest.fixture
def node() -> str:
    """The node binary, once examples/node has its packages (checked before a server starts)."""
    node = tools.require(tools.NODE)
    tools.require(tools.NODE_PACKAGES)
    return node


def test_node_client(node: str, address: str) -> None:
    done = _run([node, str(NODE_DIR / "client.js"), address])
    assert done.returncode == 0, f"client.js failed:\n{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert re.search(r"^created user \d+ ada-\w+@example\.com \(Ada Lovelace\)$", out, re.M)
    assert len(re.findall(r"^opened account \d+ \(EUR\) for user \d+$", out, re.M)) == 2
    assert re.search(r"^deposited 100\.00 into account \d+: balance 100\.00$", out, re.M)
    assert re.search(r"^transfer \d+: 25\.50 from account \d+ to account \d+$", out, re.M)
    balances = re.findall(r"^account \d+ balance (\S+)$", out, re.M)
    assert balances == ["74.50", "25.50"]
    assert re.search(
        r"^error status: FAILED_PRECONDITION \(9\): account \d+ has insufficient funds$", out, re.M
    )


@pytest.mark.requires(tools.GRPCURL)  # checked before `address` starts a server
def test_grpcurl_tour(address: str) -> None:
    assert GRPCURL is not None
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "grpcurl-tour.sh"), address],
        cwd=ROOT,
        env={**os.environ, "GRPCURL": GRPCURL},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"tour failed:\n{out}\n{done.stderr}"
    assert out.rstrip().endswith("tour complete")
    assert "shop.v1.AccountService" in out
    assert '"full_name": "Ada King"' in out  # UpdateUser changed only last_name
    assert '"next_page_token"' in out
    assert '"inserted": "1"' in out and '"updated": "1"' in out  # UpsertUsers
    assert '"status": "ORDER_STATUS_PAID"' in out
    assert '"balance": "64.50"' in out
    for code in ("AlreadyExists", "FailedPrecondition", "InvalidArgument", "NotFound"):
        assert f"Code: {code}" in out
    assert '"reason":"INSUFFICIENT_FUNDS"' in out
    # WatchChanges: a snapshot that ends SNAPSHOT_DONE, and a resume from a NOW stream's token
    # that brings the deposit made after it (grpcurl prints request_id so only in a response).
    assert "shop.v1.ChangeFeedService" in out
    assert '"event": "CHANGE_FEED_EVENT_SNAPSHOT_DONE"' in out
    assert '"operation": "OPERATION_CREATED"' in out
    assert '"request_id": "dep-feed-' in out
