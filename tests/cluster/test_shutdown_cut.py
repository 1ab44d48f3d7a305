"""A replica stopped under a slow reader's export, behind Envoy: the reader sees the replica's
own UNAVAILABLE "server shutting down" after the bytes Envoy still held for it (not a stream
reset, INTERNAL), and resumes exactly from its last token."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from deploy.cluster import Layout, running_cluster
from service.api.interceptors.shutdown import SHUTTING_DOWN
from tests import tools
from tests.process import free_port, user_env
from tests.streams.helpers import insert_users, read_until_cut, resume

USERS = 30_000  # ~2.2 MB: far more than Envoy's 256 KiB window and its send buffer hold
BATCH = 200


async def test_an_export_cut_by_a_replica_shutdown_reaches_the_reader_as_unavailable(
    database_url: str, engine: AsyncEngine, user_stub: Any, tmp_path: Path
) -> None:
    tools.require(tools.ENVOY)
    await insert_users(engine, USERS)
    async with engine.connect() as conn:
        everyone = list((await conn.scalars(text("SELECT id FROM users ORDER BY id"))).all())
    layout = Layout([free_port()], [0], envoy_port=free_port(), admin_port=free_port())
    env = user_env(SHOP_SHUTDOWN_GRACE="3", SHOP_SHUTDOWN_DRAIN_DELAY="0", SHOP_POOL_SIZE="2")
    with running_cluster(
        layout, database_url=database_url, workdir=tmp_path, env=env, logs=tmp_path
    ) as cluster:
        replica = cluster.replicas[0]
        cut = await read_until_cut(
            cluster.address, BATCH, lambda: replica.send_signal(signal.SIGTERM)
        )
        log = (tmp_path / "envoy.log").read_text()
        assert cut.error is not None, "the export finished before the shutdown cut it"
        assert cut.error.code() == grpc.StatusCode.UNAVAILABLE, (cut.error, log)
        assert cut.error.details() == SHUTTING_DOWN
        assert replica.wait(timeout=30) == 0
    assert 0 < len(cut.ids) < len(everyone)
    # The session's server plays another replica (same page-token secret).
    assert cut.ids + await resume(user_stub, cut.token) == everyone
