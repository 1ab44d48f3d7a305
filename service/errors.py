"""Domain errors. Repositories and handlers raise these; the error interceptor
(service/interceptors/errors.py) turns them into google.rpc.Status with ErrorInfo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base: a reason in UPPER_SNAKE for ErrorInfo and a message safe to show a client."""

    reason: str = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {key: str(value) for key, value in metadata.items()}


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid request: {fields}")
        self.violations = violations

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class NotFound(DomainError):
    def __init__(self, resource: str, resource_id: object) -> None:
        super().__init__(
            f"{resource} {resource_id} not found",
            reason=f"{resource.upper()}_NOT_FOUND",
            id=resource_id,
        )


class AlreadyExists(DomainError):
    """EMAIL_TAKEN, REQUEST_ID_REUSED."""

    @classmethod
    def request_id_reused(cls, request_id: str) -> AlreadyExists:
        return cls(
            f"request_id {request_id} was used for a different request",
            reason="REQUEST_ID_REUSED",
            request_id=request_id,
        )


class FailedPrecondition(DomainError):
    """INSUFFICIENT_FUNDS, CURRENCY_MISMATCH, INVALID_STATUS_TRANSITION, USER_DELETED,
    BALANCE_LIMIT_EXCEEDED (a balance would pass NUMERIC(18, 2))."""


class Unavailable(DomainError):
    """The database cannot be reached or the pool is exhausted; the client may retry."""

    reason = "DATABASE_UNAVAILABLE"

    @classmethod
    def database_down(cls) -> Unavailable:
        return cls("the database is unavailable; retry later")


class ResourceExhausted(DomainError):
    """A budget is spent (TOO_MANY_CALLS, TOO_MANY_PUBLIC_CALLS, ...): refused at once, never
    queued; the client may retry shortly."""

    reason = "RESOURCE_EXHAUSTED"


class Aborted(DomainError):
    """The server gave up on the call (STREAM_STALLED: the peer neither read nor sent for
    SHOP_STREAM_STALL_TIMEOUT); nothing half-done is kept, and the client may go on from where
    it was (an export's resume_token) or send again."""

    reason = "ABORTED"


class Unauthenticated(DomainError):
    """No bearer token, or one the server does not know."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """The token is known but its role may not call this method."""

    reason = "PERMISSION_DENIED"


class DeadlineExceeded(DomainError):
    """The caller's deadline passed while the database was working (statement_timeout set
    from the deadline, or a query PostgreSQL cancelled)."""

    reason = "DEADLINE_EXCEEDED"
