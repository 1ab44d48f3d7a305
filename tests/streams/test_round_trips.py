"""GetUser costs one statement and no transaction block (no BEGIN / ROLLBACK round trips)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy import event

from service.db.ping import PRE_PING
from service.serving.server import RunningServer
from tests.factories import Factory


def first_word(query: str) -> str:
    return query.split()[0].rstrip(";").upper()


def asyncpg_introspection(query: str) -> bool:
    """asyncpg's lookup of a type it has no codec for (bigint[], GetUser's parameter), made
    once per connection: the jit check, the lookup and the jit reset around it."""
    return "typeinfo_tree" in query or "'jit'" in query


@pytest.fixture
def wire_queries(server: RunningServer) -> Iterator[list[str]]:
    """Every query the server's connections send: the simple queries asyncpg logs (BEGIN,
    ROLLBACK, ...: SQLAlchemy's cursor events do not see those), and the statements SQLAlchemy
    runs as prepared statements (which asyncpg's query logger does not see)."""
    sent: list[str] = []
    watched: set[int] = set()

    def log(record: Any) -> None:
        sent.append(record.query)

    def statement(_conn: Any, _cursor: Any, query: str, *_args: Any) -> None:
        sent.append(query)

    def watch(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        driver = dbapi_connection.driver_connection
        if id(driver) not in watched:
            watched.add(id(driver))
            driver.add_query_logger(log)

    event.listen(server.engine.sync_engine.pool, "checkout", watch)
    event.listen(server.engine.sync_engine, "before_cursor_execute", statement)
    yield sent
    event.remove(server.engine.sync_engine, "before_cursor_execute", statement)
    event.remove(server.engine.sync_engine.pool, "checkout", watch)


async def test_get_user_is_one_statement_without_a_transaction_block(
    user_stub: user_service_pb2_grpc.UserServiceStub,
    factory: Factory,
    wire_queries: list[str],
) -> None:
    user = await factory.user()
    for _ in range(3):
        got = await user_stub.GetUser(api.GetUserRequest(id=user.id))
        assert got.email == user.email
    # One at a time, each GetUser is a batch of one: its statement alone, in autocommit (count
    # what went on the wire, leaving out the pool's pre-ping of a connection that sat idle).
    sent = [q for q in wire_queries if q != PRE_PING and not asyncpg_introspection(q)]
    assert len(sent) == 3, sent
    assert all(q.startswith("SELECT users.id") for q in sent), sent


async def test_writes_still_run_in_a_transaction(
    user_stub: user_service_pb2_grpc.UserServiceStub, wire_queries: list[str]
) -> None:
    await user_stub.CreateUser(
        api.CreateUserRequest(email="tx@example.com", first_name="Tx", last_name="Block")
    )
    assert {"BEGIN", "COMMIT"} <= set(map(first_word, wire_queries))
