"""A replica killed with SIGKILL under the mixed load: Envoy ejects it, the calls that were on
it are retried on the others (reads, and writes with a request_id), the bank stays consistent,
and the replica rejoins once started again (docs/scale-out.md has the figures)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests import tools
from tests.multihost.checks import assert_bank_intact, assert_exports_whole
from tests.multihost.cluster import Envoy, Replica
from tests.multihost.conftest import Seed
from tests.multihost.load import MixedLoad

pytestmark = [pytest.mark.slow, pytest.mark.requires(tools.IP, tools.POSTGRES_SERVER, tools.ENVOY)]

STEADY = 3.0
DOWN = 5.0  # seconds of load on the two survivors


async def test_killed_replica_is_ejected_and_no_call_fails(
    seed: Seed, replicas: list[Replica], envoy: Envoy, db: AsyncEngine
) -> None:
    load = MixedLoad(envoy.address, seed.user_ids, seed.account_ids, prefix="kill-")
    victim = replicas[1]
    figures: dict[str, float | str] = {}

    async def kill_and_revive() -> None:
        await asyncio.sleep(STEADY)
        victim.signal(signal.SIGKILL)
        figures["ejected after"] = await envoy.until(victim.address, healthy=False, within=15)
        figures["flags"] = envoy.health_flags()[victim.address]
        assert await asyncio.to_thread(victim.wait_exit, 10) == -signal.SIGKILL
        await asyncio.sleep(DOWN)
        victim.start()
        figures["rejoined after"] = await envoy.until(victim.address, healthy=True, within=60)
        await asyncio.sleep(STEADY)

    began = time.monotonic()
    await asyncio.wait_for(load.while_running(kill_and_revive()), 120)
    retries = envoy.stats("cluster.shop.upstream_rq_retry")
    ejections = envoy.stats("cluster.shop.outlier_detection.ejections_enforced_total")
    print(f"\nSIGKILL of one of 3 replicas, {time.monotonic() - began:.1f}s under load")
    print(load.summary())
    print(f"{victim.address}: {figures}; envoy: {retries} {ejections}")

    assert dict(load.tally.errors) == {}, load.summary()
    # An export on the killed replica is reset (no status can come from it): resumed too.
    assert {cut.partition(":")[0] for cut in load.tally.cuts} <= {"UNAVAILABLE", "INTERNAL"}
    assert_exports_whole(load, seed)
    await assert_bank_intact(load, seed, db)
