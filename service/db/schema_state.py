"""Where the database's schema stands against this build's migrations, read once at start.

`serve` refuses a database that is behind (SchemaBehind) unless SHOP_ALLOW_SCHEMA_BEHIND is
set; a database *ahead* of this build (a revision it does not know, written by a newer build)
is accepted, because expand-contract keeps every schema readable by the build before it.
SchemaFeatures then says which rolled-out columns this process may touch."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from service.db.migrate import alembic_config

log = logging.getLogger(__name__)

# The orders.currency rollout (alembic/versions/0003..0005): written from the expand step on,
# read only once the backfill has run. See docs/migrations.md.
ORDER_CURRENCY_ADDED = "0003"
ORDER_CURRENCY_BACKFILLED = "0004"
CHANGE_LOG = "0007"


class SchemaBehind(Exception):
    """The database lacks migrations this build needs."""

    def __init__(self, state: SchemaState) -> None:
        current = ", ".join(sorted(state.current)) or "empty (never migrated)"
        super().__init__(
            f"database schema is at {current} but this build needs "
            f"{', '.join(sorted(state.heads))}: run `python -m service migrate` first "
            "(or set SHOP_ALLOW_SCHEMA_BEHIND=true to serve anyway)"
        )


@dataclass(frozen=True)
class SchemaState:
    """The revisions in alembic_version, set against this build's migration scripts."""

    current: frozenset[str]
    heads: frozenset[str]
    # current and all their ancestors, among the revisions this build knows
    applied: frozenset[str]
    # current revisions this build has no script for: a newer build migrated the database
    unknown: frozenset[str]

    @property
    def behind(self) -> bool:
        return not self.unknown and self.current != self.heads

    def has(self, revision: str) -> bool:
        """Whether the schema includes `revision` (a newer, unknown schema includes them all)."""
        return bool(self.unknown) or revision in self.applied


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except Exception:  # alembic raises ResolutionError (and subclasses) for an unknown id
        return False


def _state(connection: Connection, script: ScriptDirectory) -> SchemaState:
    current = frozenset(MigrationContext.configure(connection).get_current_heads())
    known = {r for r in current if _known(script, r)}
    applied = {
        rev.revision
        for head in known
        for rev in script.iterate_revisions(head, "base")
        if rev is not None
    }
    return SchemaState(
        current=current,
        heads=frozenset(script.get_heads()),
        applied=frozenset(applied),
        unknown=current - known,
    )


async def read_schema_state(engine: AsyncEngine) -> SchemaState:
    """Read alembic_version with the given engine; compare with the scripts under alembic/."""
    script = ScriptDirectory.from_config(
        alembic_config(engine.url.render_as_string(hide_password=False))
    )
    async with engine.connect() as connection:
        return await connection.run_sync(_state, script)


def check_schema(state: SchemaState, *, allow_behind: bool) -> SchemaFeatures:
    """The features to serve with; raises SchemaBehind unless that is allowed."""
    if state.behind:
        if not allow_behind:
            raise SchemaBehind(state)
        log.warning("%s; serving anyway: SHOP_ALLOW_SCHEMA_BEHIND is set", SchemaBehind(state))
    elif state.unknown:
        log.info("database schema %s is newer than this build", ", ".join(sorted(state.unknown)))
    return SchemaFeatures.of(state)


async def serving_features(engine: AsyncEngine, *, allow_behind: bool) -> SchemaFeatures:
    """Read the schema state with the serving engine and check it (see check_schema)."""
    return check_schema(await read_schema_state(engine), allow_behind=allow_behind)


@dataclass(frozen=True)
class SchemaFeatures:
    """Which rolled-out columns this process may use, fixed at start from the schema state.
    At head everything is on; a server started on an older schema (SHOP_ALLOW_SCHEMA_BEHIND)
    behaves like the build that schema was made for, and keeps doing so while it runs."""

    write_order_currency: bool = True
    read_order_currency: bool = True
    change_log: bool = True  # the change feed's log (WatchChanges)

    @classmethod
    def of(cls, state: SchemaState) -> SchemaFeatures:
        return cls(
            write_order_currency=state.has(ORDER_CURRENCY_ADDED),
            read_order_currency=state.has(ORDER_CURRENCY_BACKFILLED),
            change_log=state.has(CHANGE_LOG),
        )


# Key in Session.info: the server's sessionmaker carries the features, so every repository
# sees them without each servicer passing them along.
FEATURES_KEY = "schema_features"


def session_info(features: SchemaFeatures) -> dict[str, SchemaFeatures]:
    """The `info` for a sessionmaker whose sessions should follow these features."""
    return {FEATURES_KEY: features}


def features_of(session: AsyncSession) -> SchemaFeatures:
    """The session's features; sessions made without any (tests, tools) get all of them."""
    features = session.info.get(FEATURES_KEY)
    return features if isinstance(features, SchemaFeatures) else SchemaFeatures()
