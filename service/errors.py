"""Domain errors. Repositories and handlers raise these; the error interceptor
(service/api/interceptors/errors.py) turns them into google.rpc.Status with ErrorInfo."""

from __future__ import annotations

from collections.abc import Sequence
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


# An error status travels in trailing metadata: grpc-message, and grpc-status-details-bin (the
# google.rpc.Status, with the message again, ErrorInfo and the violations, base64'd). A grpc
# client takes at most 16 KiB of it (grpc core's hard limit; past its 8 KiB soft limit a
# growing share of calls fail), and what it refuses reaches it as RESOURCE_EXHAUSTED: 1000 bad
# rows of an UpsertUsers made 62,685 bytes. So an INVALID_ARGUMENT carries the first
# MAX_VIOLATIONS violations, each field and description cut to the bytes below, and the count of
# the rest in ErrorInfo's metadata (omitted_violations); every status's message and metadata
# values are cut too (handlers/status.py). The worst INVALID_ARGUMENT is 5,541 bytes of
# trailing metadata (tests/unit/test_validation.py builds and measures it).
MAX_VIOLATIONS = 10
MAX_FIELD_BYTES = 100
MAX_DESCRIPTION_BYTES = 200
MAX_SUMMARY_BYTES = 200
MAX_MESSAGE_BYTES = 512
MAX_METADATA_BYTES = 1024


def cut(text: str, limit: int) -> str:
    """text, or its first bytes of UTF-8 (whole characters) and "..." to stay within limit."""
    if len(text) <= limit // 4:  # at most 4 bytes a character: short enough without encoding
        return text
    encoded = text.encode(errors="replace")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "..."


def _bounded(violation: FieldViolation) -> FieldViolation:
    field = cut(violation.field, MAX_FIELD_BYTES)
    description = cut(violation.description, MAX_DESCRIPTION_BYTES)
    if field is violation.field and description is violation.description:
        return violation
    return FieldViolation(field, description)


class InvalidArgument(DomainError):
    """The first MAX_VIOLATIONS field violations, bounded, and how many more there were."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation], *, omitted: int = 0) -> None:
        kept = [_bounded(v) for v in violations[:MAX_VIOLATIONS]]
        omitted += len(violations) - len(kept)
        fields = cut(", ".join(dict.fromkeys(v.field for v in kept)), MAX_SUMMARY_BYTES)
        more = f" and {omitted:,} more" if omitted else ""
        super().__init__(f"invalid request: {fields}{more}")
        if omitted:
            self.metadata["omitted_violations"] = str(omitted)
        self.violations = kept
        self.omitted = omitted

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
