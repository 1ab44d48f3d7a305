"""`serve` refuses a database whose schema is behind this build (status 3, one clear line),
serves it when SHOP_ALLOW_SCHEMA_BEHIND says so, and accepts a schema from a newer build."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
from alembic import command
from alembic.config import Config
from shop.v1 import change_feed_service_pb2, change_feed_service_pb2_grpc
from sqlalchemy import text

from service.db.engine import create_unpooled_engine
from service.db.schema_state import SchemaFeatures, check_schema, read_schema_state
from tests.migrations.conftest import serving
from tests.process import free_port, serve_once, service_env
from tests.rpc import stream_fails


def _serve_once(url: str) -> subprocess.CompletedProcess[str]:
    return serve_once(service_env(url, free_port()), timeout=120)


def test_serve_refuses_a_schema_behind_the_build(scratch_url: str, scratch_config: Config) -> None:
    command.upgrade(scratch_config, "0002")

    done = _serve_once(scratch_url)

    assert done.returncode == 3, done.stderr
    assert "refusing to serve: database schema is at 0002 but this build needs" in done.stderr
    assert "python -m service migrate" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_a_database_never_migrated(scratch_url: str) -> None:
    done = _serve_once(scratch_url)

    assert done.returncode == 3, done.stderr
    assert "database schema is at empty (never migrated)" in done.stderr


async def test_allow_schema_behind_serves_anyway(
    scratch_url: str, scratch_config: Config, tmp_path: Path
) -> None:
    await asyncio.to_thread(command.upgrade, scratch_config, "0002")
    log = tmp_path / "serve.log"
    with serving(scratch_url, log, SHOP_ALLOW_SCHEMA_BEHIND="true") as (address, process):
        assert process.poll() is None
        # The change feed needs its log (0007): refused with a reason, not INTERNAL.
        async with grpc.aio.insecure_channel(address) as channel:
            feed = change_feed_service_pb2_grpc.ChangeFeedServiceStub(channel)
            failure = await stream_fails(
                feed.WatchChanges(change_feed_service_pb2.WatchChangesRequest())
            )
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "SCHEMA_BEHIND"
    assert "serving anyway: SHOP_ALLOW_SCHEMA_BEHIND is set" in log.read_text()


async def test_a_schema_from_a_newer_build_is_accepted(
    scratch_url: str, scratch_config: Config
) -> None:
    # Expand-contract keeps every schema usable by the build before it, so a rollback of the
    # code (or an old replica restarting) must not be refused by a migration it does not know.
    await asyncio.to_thread(command.upgrade, scratch_config, "head")
    engine = create_unpooled_engine(scratch_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
        state = await read_schema_state(engine)
    finally:
        await engine.dispose()

    assert state.unknown == {"9999_future"}
    assert not state.behind
    assert check_schema(state, allow_behind=False) == SchemaFeatures()


async def test_features_follow_the_rollouts(scratch_url: str, scratch_config: Config) -> None:
    seen = {}
    engine = create_unpooled_engine(scratch_url)
    try:
        for revision in ("0002", "0003", "0004", "0006", "head"):
            await asyncio.to_thread(command.upgrade, scratch_config, revision)
            seen[revision] = SchemaFeatures.of(await read_schema_state(engine))
    finally:
        await engine.dispose()

    assert seen == {
        "0002": SchemaFeatures(
            write_order_currency=False, read_order_currency=False, change_log=False
        ),
        "0003": SchemaFeatures(
            write_order_currency=True, read_order_currency=False, change_log=False
        ),
        "0004": SchemaFeatures(
            write_order_currency=True, read_order_currency=True, change_log=False
        ),
        "0006": SchemaFeatures(
            write_order_currency=True, read_order_currency=True, change_log=False
        ),
        "head": SchemaFeatures(
            write_order_currency=True, read_order_currency=True, change_log=True
        ),
    }
