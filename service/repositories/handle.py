"""What every repository is built on: the handle its door gave (see the package docstring)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession


class Repository:
    """A repository on `on`, a unit of work's session or a batch's connection: the Core
    statements run on either, the ORM ones need the session."""

    def __init__(self, on: AsyncSession | AsyncConnection) -> None:
        self.on = on

    @property
    def session(self) -> AsyncSession:
        """What the ORM methods run on: the unit of work's session, not a batch's connection."""
        assert isinstance(self.on, AsyncSession), "this method needs an AsyncSession"
        return self.on
