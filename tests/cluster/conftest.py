"""Envoy in front of real replicas (real `python -m service serve` processes) on the tests'
PostgreSQL, started by deploy/cluster.py's running_cluster() — the code `make run-cluster`
runs. `envoy_cluster` (session) for any test that goes through the front door; curl.py sends
JSON over HTTP as a user's shell would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.cluster import Cluster, Layout, running_cluster
from tests import tools
from tests.process import free_port, user_env

REPLICAS = 2


@pytest.fixture(scope="session")
def envoy_cluster(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two replicas and Envoy, every upstream healthy; stopped (replicas drain) at the end."""
    tools.require(tools.ENVOY)
    workdir = tmp_path_factory.mktemp("envoy-cluster")
    layout = Layout(
        replica_ports=[free_port() for _ in range(REPLICAS)],
        metrics_ports=[0] * REPLICAS,
        envoy_port=free_port(),
        admin_port=free_port(),
    )
    env = user_env(SHOP_SHUTDOWN_GRACE="2", SHOP_SHUTDOWN_DRAIN_DELAY="0", SHOP_POOL_SIZE="4")
    with running_cluster(
        layout, database_url=database_url, workdir=workdir, env=env, logs=workdir
    ) as cluster:
        yield cluster
