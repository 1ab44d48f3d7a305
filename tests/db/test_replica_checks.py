"""The replica check (service/db/replicas.py) against a real server that is not a standby."""

from __future__ import annotations

import math

from service.config import Settings
from service.db.replicas import open_replicas


async def test_a_server_not_in_recovery_is_never_used_as_a_replica(database_url: str) -> None:
    replicas = open_replicas(Settings(database_replica_urls=database_url))
    assert replicas is not None
    try:
        await replicas.check_all()
        assert [(r.usable, r.lag) for r in replicas.replicas] == [(False, math.inf)]
        assert replicas.pick() is None  # reads go to the primary
    finally:
        await replicas.close(1.0)
