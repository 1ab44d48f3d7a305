"""Which RPC reads where: the one table.

A read that tolerates a little staleness (a page a client will fetch again, an export that is a
snapshot of some recent moment anyway) goes to a replica when SHOP_DATABASE_REPLICA_URLS names
one that is up and within SHOP_REPLICA_MAX_LAG (service/db/replicas.py); with none usable, to
the primary. A read a client acts on (a balance) and everything a write reads stay on the
primary. An RPC missing from the table reads the primary: a new read is fresh until someone
decides otherwise here. The README's "Which RPC reads where" mirrors this table, and
tests/unit/test_routing.py holds the two together.

Database.read() and Database.snapshot() follow the table for the RPC being served (bound per
call by service/api/interceptors/call_scope.py); write(), transaction(), point_reads() and batched()
always use the primary.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from enum import StrEnum


class ReadsFrom(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(frozen=True, slots=True)
class Route:
    reads_from: ReadsFrom
    staleness: str  # what a caller may see, in the README's words


PRIMARY = ReadsFrom.PRIMARY
REPLICA = ReadsFrom.REPLICA
FRESH = "none: reads the primary"
LAGGED = "up to SHOP_REPLICA_MAX_LAG (+ one check interval); typically milliseconds"
LAGGED_SNAPSHOT = "one snapshot, up to SHOP_REPLICA_MAX_LAG old when it starts"

ROUTES: dict[str, Route] = {
    # UserService
    "/shop.v1.UserService/GetUser": Route(PRIMARY, FRESH + " (coalesced point read)"),
    "/shop.v1.UserService/ListUsers": Route(REPLICA, LAGGED),
    "/shop.v1.UserService/StreamUsers": Route(REPLICA, LAGGED_SNAPSHOT),
    # OrderService
    "/shop.v1.OrderService/GetOrder": Route(PRIMARY, FRESH),
    "/shop.v1.OrderService/ListOrders": Route(REPLICA, LAGGED),
    "/shop.v1.OrderService/StreamOrders": Route(REPLICA, LAGGED_SNAPSHOT),
    # AccountService: a balance is what a client acts on.
    "/shop.v1.AccountService/GetAccount": Route(PRIMARY, FRESH + ": a balance a client acts on"),
    "/shop.v1.AccountService/ListTransfers": Route(REPLICA, LAGGED),
    "/shop.v1.AccountService/StreamTransfers": Route(REPLICA, LAGGED_SNAPSHOT),
}

_reads_from: contextvars.ContextVar[ReadsFrom] = contextvars.ContextVar(
    "reads_from", default=PRIMARY
)


def route_of(method: str) -> ReadsFrom:
    """Where `method` (a full gRPC method name) reads; the primary when it is not listed."""
    route = ROUTES.get(method)
    return PRIMARY if route is None else route.reads_from


def bind_reads_from(reads_from: ReadsFrom) -> None:
    """Record where the current RPC reads, for its read() and snapshot()."""
    _reads_from.set(reads_from)


def current_reads_from() -> ReadsFrom:
    """Where the current RPC reads (the primary outside an RPC: tests, tools)."""
    return _reads_from.get()
