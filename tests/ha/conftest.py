"""A Patroni cluster for the failover tests: etcd and two PostgreSQL nodes (primary and
synchronous standby), started by the launcher `make run-ha` uses (deploy/patroni/cluster.py),
migrated, and shop-service serving on its multi-host URL as a real process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from deploy.patroni.cluster import Cluster, patroni_cluster
from service.db.migrate import upgrade
from tests import tools
from tests.process import Served, served_process


@pytest.fixture
def patroni() -> Iterator[Cluster]:
    """A fresh cluster per test (a failover test leaves it changed), its database migrated
    through the multi-host URL."""
    for tool in (tools.PATRONI, tools.ETCD, tools.POSTGRES_SERVER):
        tools.require(tool)
    with patroni_cluster() as cluster:
        upgrade(cluster.url())
        yield cluster


@pytest_asyncio.fixture
async def ha_served(patroni: Cluster, tmp_path: Path) -> AsyncIterator[Served]:
    """`python -m service serve` with SHOP_DATABASE_URL the cluster's multi-host URL."""
    log = tmp_path / "serve.log"
    env = {"SHOP_POOL_TIMEOUT": "2", "SHOP_HEALTH_INTERVAL": "0.5"}
    async with served_process(patroni.url(), log, **env) as served:
        yield served
