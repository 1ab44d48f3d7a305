"""A PostgreSQL of our own that a fault test may stop and start (never the shared one).

Debian's initdb and pg_ctl, run as the `postgres` OS user when we are root, in a temporary
directory, on a free port. `stop()` is `pg_ctl stop -m immediate` (the server vanishes as in a
crash or a network cut); `start()` brings it back on the same port with the same data.
Also used by bench/soak.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from deploy.processes import free_port as free_port  # one definition, re-exported

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
START_TIMEOUT = 30


def pg_binary(name: str) -> str | None:
    for directory in BIN_DIRS:
        if (directory / name).is_file():
            return str(directory / name)
    return shutil.which(name)


def available() -> bool:
    return pg_binary("initdb") is not None and pg_binary("pg_ctl") is not None


class OwnPostgres:
    """One initdb'd cluster in `root`, listening on 127.0.0.1:`port`, trust auth. `also_listen`
    adds addresses and `trusted` the subnets allowed to connect through them (the multi-host
    tests' bridge: tests/multihost/)."""

    def __init__(
        self,
        root: Path,
        port: int,
        also_listen: tuple[str, ...] = (),
        trusted: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self.data = root / "data"
        self.port = port
        self.listen = ",".join(("127.0.0.1", *also_listen))
        self.trusted = trusted
        self.log = root / "postgres.log"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout)

    def init(self) -> None:
        if self._as_postgres:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres")
        initdb = pg_binary("initdb")
        assert initdb is not None
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.writelines(f"host all all {subnet} trust\n" for subnet in self.trusted)

    def start(self) -> None:
        pg_ctl = pg_binary("pg_ctl")
        assert pg_ctl is not None
        options = f"-p {self.port} -c listen_addresses={self.listen} -k {self.root} -c fsync=off"
        self._run(pg_ctl, "start", "-w", "-t", str(START_TIMEOUT), "-D", str(self.data),
                  "-l", str(self.log), "-o", options)  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        pg_ctl = pg_binary("pg_ctl")
        assert pg_ctl is not None
        self._run(pg_ctl, "stop", "-w", "-m", mode, "-D", str(self.data))

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def wait_accepting(self, timeout: float = START_TIMEOUT) -> None:
        """Until the port accepts TCP connections (pg_ctl -w already waits for readiness)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"


@contextmanager
def own_postgres(
    also_listen: tuple[str, ...] = (), trusted: tuple[str, ...] = ()
) -> Iterator[OwnPostgres]:
    """Initialise, start, yield; always stop (immediate) and delete at the end."""
    with tempfile.TemporaryDirectory(prefix="shop-own-pg-") as tmp:
        server = OwnPostgres(Path(tmp), free_port(), also_listen, trusted)
        server.init()
        server.start()
        try:
            yield server
        finally:
            if server.is_running():
                with suppress(subprocess.SubprocessError):
                    server.stop("immediate")
