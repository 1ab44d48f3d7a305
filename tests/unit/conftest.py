"""Pure functions only: no database, so the table-cleaning fixture is a no-op here."""

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_tables() -> Iterator[None]:
    yield
