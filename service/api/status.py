"""A domain error as a google.rpc.Status: its code, a message safe to show, ErrorInfo with the
reason, BadRequest field violations, RetryInfo for UNAVAILABLE and RESOURCE_EXHAUSTED. The error
interceptor sends it as a call's status; BatchTransfer puts one in each refused item's result."""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service import errors

DOMAIN = "shop.v1"

_CODES: list[tuple[type[errors.DomainError], int]] = [
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
    (errors.Aborted, code_pb2.ABORTED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.DeadlineExceeded, code_pb2.DEADLINE_EXCEEDED),
]


def packed(message: Message) -> any_pb2.Any:
    result = any_pb2.Any()
    result.Pack(message)
    return result


def status_message(error: errors.DomainError) -> status_pb2.Status:
    code = next(c for cls, c in _CODES if isinstance(error, cls))
    # Cut to what trailing metadata carries (see service/errors.py): a message or metadata may
    # name what the request held (USER_DELETED lists up to 10 emails of up to 320 characters).
    metadata = {k: errors.cut(v, errors.MAX_METADATA_BYTES) for k, v in error.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    details = [packed(info)]
    if isinstance(error, errors.InvalidArgument):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
        details.append(packed(error_details_pb2.BadRequest(field_violations=violations)))
    if isinstance(error, errors.Unavailable | errors.ResourceExhausted):
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
        details.append(packed(retry))
    message = errors.cut(error.message, errors.MAX_MESSAGE_BYTES)
    return status_pb2.Status(code=code, message=message, details=details)
