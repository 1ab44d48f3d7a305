"""What each shop.v1 method is, in one table: the role it needs (below), where it reads
(service/db/routing.py's ROUTES). The interceptors read it; nothing below the gRPC room does."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    READ = "read"
    WRITE = "write"


# Every shop.v1 method and the role it needs; a write token may also read. A method missing
# here needs WRITE (see required_role), so a new RPC is closed until someone classifies it.
METHOD_ROLES: dict[str, Role] = {
    "/shop.v1.UserService/CreateUser": Role.WRITE,
    "/shop.v1.UserService/GetUser": Role.READ,
    "/shop.v1.UserService/UpdateUser": Role.WRITE,
    "/shop.v1.UserService/DeleteUser": Role.WRITE,
    "/shop.v1.UserService/UndeleteUser": Role.WRITE,
    "/shop.v1.UserService/ListUsers": Role.READ,
    "/shop.v1.UserService/StreamUsers": Role.READ,
    "/shop.v1.UserService/UpsertUsers": Role.WRITE,
    "/shop.v1.UserService/ImportUsers": Role.WRITE,
    "/shop.v1.OrderService/CreateOrder": Role.WRITE,
    "/shop.v1.OrderService/GetOrder": Role.READ,
    "/shop.v1.OrderService/ListOrders": Role.READ,
    "/shop.v1.OrderService/StreamOrders": Role.READ,
    "/shop.v1.OrderService/UpdateOrderStatus": Role.WRITE,
    "/shop.v1.AccountService/OpenAccount": Role.WRITE,
    "/shop.v1.AccountService/GetAccount": Role.READ,
    "/shop.v1.AccountService/Deposit": Role.WRITE,
    "/shop.v1.AccountService/Withdraw": Role.WRITE,
    "/shop.v1.AccountService/Transfer": Role.WRITE,
    "/shop.v1.AccountService/BatchTransfer": Role.WRITE,
    "/shop.v1.AccountService/ListTransfers": Role.READ,
    "/shop.v1.AccountService/StreamTransfers": Role.READ,
}

# Probes and tools must work without a token: load balancers do not carry one.
PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def required_role(method: str) -> Role | None:
    """None for public methods, else the role the method needs."""
    if method.startswith(PUBLIC_PREFIXES):
        return None
    return METHOD_ROLES.get(method, Role.WRITE)
