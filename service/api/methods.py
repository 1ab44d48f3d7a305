"""What each shop.v1 method is, in one table: the role it needs, where it reads (and so how
stale its answer may be), and whether it is idempotent by request_id. Auth, admission and the
call scope read it here, once per method; the database layer is handed a call's route by the
call-scope interceptor (service/db/routing.py) and never imports this. docs/scale-out.md's read
table and the README's Security section mirror it (tests/unit/test_routing.py,
tests/unit/test_methods.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.db.routing import PRIMARY, REPLICA, ReadsFrom


class Role(StrEnum):
    READ = "read"
    WRITE = "write"


READ = Role.READ
WRITE = Role.WRITE

# A read that tolerates a little staleness (a page a client will fetch again, an export that is
# a snapshot of some recent moment anyway) goes to a replica when SHOP_DATABASE_REPLICA_URLS
# names one that is up and within SHOP_REPLICA_MAX_LAG (service/db/replicas.py); with none
# usable, to the primary. A read a client acts on (a balance) and everything a write reads stay
# on the primary.
FRESH = "none: reads the primary"
LAGGED = "up to SHOP_REPLICA_MAX_LAG (+ one check interval); typically milliseconds"
LAGGED_SNAPSHOT = "one snapshot, up to SHOP_REPLICA_MAX_LAG old when it starts"
# The change feed reads where it is sent and waits for a replica behind a token's position.
# The change feed takes every snapshot on the primary (a standby's pg_current_snapshot() lists
# no transaction in progress on the primary) and reads the log on a replica once it has
# replayed past the primary's WAL position at that snapshot (docs/change-feed.md: Replicas).
FOLLOWS_REPLAY = "up to one poll and the replica's replay; a position never goes back"


@dataclass(frozen=True, slots=True)
class Method:
    role: Role
    reads_from: ReadsFrom = PRIMARY
    staleness: str = FRESH  # what a caller may see, in the docs' words
    # The request carries a request_id: a repeat gets the first call's answer, applied once.
    idempotent: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    reads_from: ReadsFrom
    staleness: str


# Every shop.v1 method. A method missing here needs WRITE (required_role) and reads the primary
# (route_of): a new RPC is closed and fresh until someone classifies it.
METHODS: dict[str, Method] = {
    # UserService
    "/shop.v1.UserService/CreateUser": Method(WRITE),
    "/shop.v1.UserService/GetUser": Method(READ, PRIMARY, FRESH + " (coalesced point read)"),
    "/shop.v1.UserService/UpdateUser": Method(WRITE),
    "/shop.v1.UserService/DeleteUser": Method(WRITE),
    "/shop.v1.UserService/UndeleteUser": Method(WRITE),
    "/shop.v1.UserService/ListUsers": Method(READ, REPLICA, LAGGED),
    "/shop.v1.UserService/StreamUsers": Method(READ, REPLICA, LAGGED_SNAPSHOT),
    "/shop.v1.UserService/UpsertUsers": Method(WRITE),
    "/shop.v1.UserService/ImportUsers": Method(WRITE),
    # OrderService
    "/shop.v1.OrderService/CreateOrder": Method(WRITE, idempotent=True),
    "/shop.v1.OrderService/GetOrder": Method(READ, PRIMARY, FRESH),
    "/shop.v1.OrderService/ListOrders": Method(READ, REPLICA, LAGGED),
    "/shop.v1.OrderService/StreamOrders": Method(READ, REPLICA, LAGGED_SNAPSHOT),
    "/shop.v1.OrderService/UpdateOrderStatus": Method(WRITE),
    # AccountService: a balance is what a client acts on.
    "/shop.v1.AccountService/OpenAccount": Method(WRITE, idempotent=True),
    "/shop.v1.AccountService/GetAccount": Method(
        READ, PRIMARY, FRESH + ": a balance a client acts on"
    ),
    "/shop.v1.AccountService/Deposit": Method(WRITE, idempotent=True),
    "/shop.v1.AccountService/Withdraw": Method(WRITE, idempotent=True),
    "/shop.v1.AccountService/Transfer": Method(WRITE, idempotent=True),
    # Each item by its own request_id.
    "/shop.v1.AccountService/BatchTransfer": Method(WRITE, idempotent=True),
    "/shop.v1.AccountService/ListTransfers": Method(READ, REPLICA, LAGGED),
    "/shop.v1.AccountService/StreamTransfers": Method(READ, REPLICA, LAGGED_SNAPSHOT),
    # ChangeFeedService
    "/shop.v1.ChangeFeedService/WatchChanges": Method(READ, REPLICA, FOLLOWS_REPLAY),
}

# Derived views, for the interceptors and the tables in the docs.
METHOD_ROLES: dict[str, Role] = {name: m.role for name, m in METHODS.items()}
ROUTES: dict[str, Route] = {
    name: Route(m.reads_from, m.staleness) for name, m in METHODS.items() if m.role is READ
}

# Probes and tools must work without a token: load balancers do not carry one.
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def required_role(method: str) -> Role | None:
    """None for public methods, else the role the method needs."""
    if method.startswith(PUBLIC_PREFIXES):
        return None
    return METHOD_ROLES.get(method, Role.WRITE)


def route_of(method: str) -> ReadsFrom:
    """Where `method` (a full gRPC method name) reads; the primary when it is not listed."""
    found = METHODS.get(method)
    return PRIMARY if found is None else found.reads_from
