"""Bearer-token authentication and read/write authorization for shop.v1 methods."""

from __future__ import annotations

import hashlib
import hmac

from service import errors
from service.api.context import Context
from service.api.interceptors.around import CallHooks, wrap_around
from service.api.interceptors.errors import abort_for
from service.api.interceptors.wrapping import Handler, WrappingInterceptor
from service.api.methods import Role, required_role
from service.config import Settings, parse_token_roles

_BEARER = "bearer "


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


def bearer_token(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith(_BEARER):
            return value[len(_BEARER) :].strip()
    return None


class Gate(CallHooks):
    """Checks one call's token before the servicer runs. Failures go through the one error
    mapping (interceptors/errors.py); the token itself is never logged or echoed."""

    def __init__(self, tokens: TokenTable, needed: Role) -> None:
        self.tokens = tokens
        self.needed = needed

    async def before(self, context: Context) -> None:
        token = bearer_token(context)
        role = self.tokens.role_of(token) if token else None
        if role is None:
            error: errors.DomainError = errors.Unauthenticated(
                "a valid bearer token is required (authorization: Bearer <token>)"
            )
        elif self.needed is Role.WRITE and role is not Role.WRITE:
            error = errors.PermissionDenied("this token may only read", required=self.needed)
        else:
            return
        await abort_for(error, context)


class AuthInterceptor(WrappingInterceptor):
    """Lets public methods (health, reflection) through; gates the rest by role."""

    def __init__(self, tokens: TokenTable) -> None:
        super().__init__()
        self.tokens = tokens

    def wrap(self, method: str, handler: Handler) -> Handler:
        needed = required_role(method)
        if needed is None:
            return handler
        gate = Gate(self.tokens, needed)  # holds no per-call state: one serves every call
        return wrap_around(handler, lambda: gate)
