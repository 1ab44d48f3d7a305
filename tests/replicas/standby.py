"""A streaming replica of a test-owned PostgreSQL (tests/faults/own_postgres.py): a copy taken
with `pg_basebackup -R` (which writes primary_conninfo and standby.signal), started as a hot
standby on a port of its own.

initdb's defaults already make any PostgreSQL 15 a primary a standby can stream from:
wal_level=replica, max_wal_senders=10, and pg_hba.conf's `host replication all 127.0.0.1/32`
line (trust, as the rest of a test cluster).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.faults.own_postgres import OwnPostgres, free_port

# As docs/scale-out.md advises for a replica that serves exports:
# - hot_standby_feedback: the standby reports its oldest snapshot to the primary, whose VACUUM
#   and pruning then keep the row versions that snapshot needs, so replaying them rarely
#   conflicts with an export (only in the first wal_receiver_status_interval of a snapshot,
#   before its first report reaches the primary);
# - max_standby_streaming_delay=-1: a conflict that still happens makes replay wait for the
#   export instead of cancelling it; the replica lags meanwhile, and the service's lag check
#   sends other reads to the primary until it catches up.
STANDBY_SETTINGS = {
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "max_standby_streaming_delay": "-1",
    "wal_receiver_status_interval": "1s",
}


def start_standby(primary: OwnPostgres, root: Path, pg_basebackup: str) -> OwnPostgres:
    """Copy `primary` into root/data and start it as its hot standby; returns it running."""
    standby = OwnPostgres(root, free_port())
    command = [
        pg_basebackup, "-D", str(standby.data), "-h", "127.0.0.1", "-p", str(primary.port),
        "-U", "postgres", "-R", "-X", "stream", "-c", "fast",
    ]  # fmt: skip
    if os.geteuid() == 0:  # the server runs as postgres, and so must own its files
        os.chmod(root, 0o755)
        shutil.chown(root, "postgres")
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with (standby.data / "postgresql.auto.conf").open("a") as conf:
        conf.writelines(f"{name} = '{value}'\n" for name, value in STANDBY_SETTINGS.items())
    standby.start()
    return standby
