"""Bearer-token authentication and read/write authorization for shop.v1 methods."""

from __future__ import annotations

from service import errors
from service.api.context import Context
from service.api.interceptors.around import CallHooks, wrap_around
from service.api.interceptors.errors import abort_for
from service.api.interceptors.wrapping import Handler, WrappingInterceptor
from service.serving.security import Role, TokenTable, required_role

_BEARER = "bearer "


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
