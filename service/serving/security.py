"""Who may call what: bearer tokens with a role, the read/write class of every shop.v1 RPC, and
the rules that keep a server without tokens, or with the public page-token key, on loopback."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from enum import StrEnum

from service.config import DEV_PAGE_TOKEN_SECRET, Settings, parse_token_roles


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


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps even a token's length out of the timing.
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """The configured tokens, kept as digests and checked in constant time."""

    def __init__(self, token_roles: dict[str, str]) -> None:
        self._entries = [(_digest(token), Role(role)) for token, role in token_roles.items()]

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenTable | None:
        """None when auth is off; Settings guarantees tokens that are set hold a pair."""
        if settings.auth_tokens is None:
            return None
        return cls(parse_token_roles(settings.auth_tokens.get_secret_value()))

    def role_of(self, token: str) -> Role | None:
        """The token's role; every entry is compared, whether or not one matched already."""
        candidate = _digest(token)
        found: Role | None = None
        for digest, role in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = role
        return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class InsecureBindError(RuntimeError):
    """A non-loopback address with no tokens (and no SHOP_ALLOW_INSECURE) or with the
    development page-token secret."""


def uses_dev_page_token_secret(settings: Settings) -> bool:
    return settings.page_token_secret.get_secret_value() == DEV_PAGE_TOKEN_SECRET


def check_exposure(settings: Settings) -> None:
    """Refuse to serve the network without authentication, or with page tokens anyone can sign."""
    if is_loopback(settings.grpc_host):
        return
    problems = []
    if settings.auth_tokens is None and not settings.allow_insecure:
        problems.append(
            "without SHOP_AUTH_TOKENS (set tokens, bind 127.0.0.1, or set SHOP_ALLOW_INSECURE=true)"
        )
    # SHOP_ALLOW_INSECURE opts out of tokens only: the development secret is in the repository,
    # and a new secret costs an operator one variable.
    if uses_dev_page_token_secret(settings):
        problems.append(
            "with the development page-token secret (set SHOP_PAGE_TOKEN_SECRET to a long random "
            "string, the same on every replica)"
        )
    if problems:
        raise InsecureBindError(f"refusing to serve {settings.grpc_host} " + " and ".join(problems))


def exposure_warnings(settings: Settings) -> list[str]:
    """What a server that check_exposure let through should say at start."""
    warnings = []
    if settings.auth_tokens is None:
        warnings.append("SHOP_AUTH_TOKENS is unset: every caller may read and write")
    if uses_dev_page_token_secret(settings):
        warnings.append(
            "the development page-token secret is in use: anyone can sign page tokens this "
            "server accepts; set SHOP_PAGE_TOKEN_SECRET"
        )
    return warnings
