"""gRPC-Web from a real browser: headless Chromium (tests/chromium.py) loads examples/browser's
page from a local HTTP server; the page calls UserService through Envoy's grpc_web filter
(deploy/envoy) in front of `serve` replicas (deploy/cluster.py) on the tests' PostgreSQL, and the
test reads what the page shows.

The page and Envoy listen on different ports, so they are different origins: every call is a
cross-origin POST with gRPC-Web headers, which Chromium sends only after a CORS preflight that
Envoy's cors filter answers. A page whose calls succeeded therefore also shows CORS working."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import pytest
from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.cluster import Cluster
from tests import tools
from tests.chromium import chromium
from tests.process import ROOT

pytestmark = pytest.mark.requires(tools.CHROMIUM, tools.BROWSER_PAGE, tools.ENVOY)

PAGE = ROOT / "examples" / "browser" / "dist"
# The page asks StreamUsers for batches of 500: 2,500 rows cross the wire in several messages.
STREAM_ROWS = 2_500
PAGE_TIMEOUT = 60.0


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    """examples/browser/dist served over HTTP on 127.0.0.1 (an origin Envoy is not)."""
    handler = functools.partial(_QuietHandler, directory=str(PAGE))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# Every element with an id: its text and its data-* attributes.
SHOWN = """JSON.stringify(Object.fromEntries([...document.querySelectorAll("[id]")]
    .map((e) => [e.id, { text: e.textContent, data: { ...e.dataset } }])))"""


@dataclass(frozen=True)
class Page:
    """What the page showed once body[data-done] was set."""

    text: dict[str, str]
    data: dict[str, dict[str, str]]


def load_page(origin: str, envoy_url: str, user_id: int, tmp_path: Path) -> Page:
    """Chromium opens the page, waits until it says it is done, and reads what it shows."""
    url = f"{origin}/index.html?" + urlencode({"envoy": envoy_url, "user": user_id})
    log = tmp_path / "chromium.log"
    with chromium(tmp_path / "profile", log) as browser:
        browser.open(url, timeout=PAGE_TIMEOUT)
        try:
            browser.wait_for("document.body?.dataset.done === 'true'", timeout=PAGE_TIMEOUT)
        except TimeoutError:
            shown = browser.evaluate("document.body?.outerHTML", timeout=PAGE_TIMEOUT)
            pytest.fail(f"the page did not finish in {PAGE_TIMEOUT:.0f}s:\n{shown}")
        shown = json.loads(browser.evaluate(SHOWN, timeout=PAGE_TIMEOUT))
    return Page(
        text={key: value["text"] for key, value in shown.items()},
        data={key: value["data"] for key, value in shown.items()},
    )


async def visible_users(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        count = await conn.scalar(text("SELECT count(*) FROM users WHERE deleted_at IS NULL"))
    return int(count or 0)


def create_users(address: str) -> pb.User:
    """Through the front door's gRPC: one named user, then the rest of STREAM_ROWS in bulk."""
    with grpc.insecure_channel(address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        user = stub.CreateUser(
            api.CreateUserRequest(
                email="zoe.angstrom@example.com", first_name="Zoë", last_name="Ångström"
            ),
            timeout=30,
        )
        rows = [
            api.UpsertUser(email=f"browser{n}@example.com", first_name="Web", last_name=f"U{n}")
            for n in range(1, STREAM_ROWS)
        ]
        for start in range(0, len(rows), 1_000):
            chunk = rows[start : start + 1_000]
            stub.UpsertUsers(api.UpsertUsersRequest(users=chunk), timeout=60)
    return user


async def test_page_shows_the_user_and_every_streamed_row(
    envoy_cluster: Cluster, page_origin: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    cluster = envoy_cluster
    cors_passed = cluster.admin.stat("http.front.cors.origin_valid")
    user = create_users(cluster.address)
    assert await visible_users(engine) == STREAM_ROWS

    page = load_page(page_origin, cluster.url, user.id, tmp_path)

    assert page.text["get-user-error"] == ""
    assert page.text["stream-users-error"] == ""
    assert page.text["user-id"] == str(user.id)
    assert page.text["user-email"] == "zoe.angstrom@example.com"
    assert page.text["user-first-name"] == "Zoë"
    assert page.text["user-last-name"] == "Ångström"
    assert page.text["user-full-name"] == "Zoë Ångström"
    assert page.text["user-active"] == "true"
    assert page.text["stream-rows"] == str(STREAM_ROWS)
    assert int(page.text["stream-batches"]) == STREAM_ROWS // 500
    last_id = await _last_visible_id(engine)
    assert page.text["stream-last-id"] == str(last_id)
    # The page's origin is not Envoy's: its calls passed Envoy's cors filter.
    assert cluster.admin.stat("http.front.cors.origin_valid") - cors_passed >= 2


async def _last_visible_id(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        last = await conn.scalar(text("SELECT max(id) FROM users WHERE deleted_at IS NULL"))
    return int(last or 0)


async def test_page_shows_not_found_for_a_missing_user(
    envoy_cluster: Cluster, page_origin: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    missing = 987_654_321
    page = load_page(page_origin, envoy_cluster.url, missing, tmp_path)

    assert page.data["get-user-error"] == {"code": "5"}
    assert page.text["get-user-error"] == f"NOT_FOUND (5): user {missing} not found"
    assert page.text["user-email"] == ""
    # The stream still ran, and found the empty table.
    assert page.text["stream-users-error"] == ""
    assert page.text["stream-rows"] == str(await visible_users(engine)) == "0"
