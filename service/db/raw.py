"""The asyncpg layer under SQLAlchemy: a session's driver connection, statements compiled once
for the driver, and the rows it returns. What the hot paths (service/db/driver.py,
service/db/streaming.py) run on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import ClauseElement
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.compiler import SQLCompiler

_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]


class Row(asyncpg.Record):  # type: ignore[misc]
    """A row as asyncpg decodes it: a tuple of the statement's columns that also reads them by
    name (row.id), like SQLAlchemy's Row."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


Rows = Sequence[Row]


async def driver_of(session: AsyncSession) -> asyncpg.Connection:
    """The asyncpg connection under the session's connection (in its transaction, if any)."""
    connection = await session.connection()
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None  # a connection checked out of the pool is open
    return driver


@dataclass(frozen=True, slots=True)
class Statement:
    """A statement compiled once for asyncpg: its SQL with $n placeholders, the bound names in
    placeholder order, and the values bound in the statement itself (literals the caller does
    not pass)."""

    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]

    @classmethod
    def compile(cls, stmt: ClauseElement) -> Statement:
        compiled = stmt.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
        assert isinstance(compiled, SQLCompiler)
        names = tuple(compiled.positiontup or ())
        return cls(str(compiled), names, dict(compiled.params))

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[n] if n in params else self.defaults[n] for n in self.names]

    async def fetchval(self, driver: asyncpg.Connection, **params: Any) -> Any:
        return await driver.fetchval(self.sql, *self.args(params))

    async def execute(self, driver: asyncpg.Connection, **params: Any) -> None:
        await driver.execute(self.sql, *self.args(params))

    async def fetchrow(self, driver: asyncpg.Connection, **params: Any) -> Row | None:
        row: Row | None = await driver.fetchrow(self.sql, *self.args(params), record_class=Row)
        return row

    async def fetch(self, driver: asyncpg.Connection, **params: Any) -> list[Row]:
        rows: list[Row] = await driver.fetch(self.sql, *self.args(params), record_class=Row)
        return rows
