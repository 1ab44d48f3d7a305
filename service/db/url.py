"""Where the database is: SHOP_DATABASE_URL, or the embedded PostgreSQL when it is unset."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.config import Settings
from service.db.embedded import start_embedded


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The asyncpg URL to use; an embedded server started here stops when the block ends."""
    if settings.database_url is not None:
        yield settings.database_url.get_secret_value()
        return
    url, server = start_embedded(settings.data_dir / "pg")
    with server:
        yield url
