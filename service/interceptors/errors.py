"""The one place that turns exceptions into gRPC status: domain errors keep their code and
reason; database outages become UNAVAILABLE; anything else is INTERNAL with a generic message
(the stack trace goes to the log only)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import exc as sa_exc

from service import errors
from service.handlers.context import Context
from service.interceptors.wrapping import Handler, Interceptor, wrap_handler

log = logging.getLogger(__name__)

DOMAIN = "shop.v1"

_CODES: list[tuple[type[errors.DomainError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: errors.DomainError) -> grpc.Status:
    code = next(c for cls, c in _CODES if isinstance(error, cls))
    details = [
        _packed(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
        )
    ]
    if isinstance(error, errors.InvalidArgument):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
        details.append(_packed(error_details_pb2.BadRequest(field_violations=violations)))
    if isinstance(error, errors.Unavailable):
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1))
        details.append(_packed(retry))
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def as_domain_error(exc: BaseException) -> errors.DomainError | None:
    """Domain errors as they are; lost database connections and pool timeouts as Unavailable."""
    if isinstance(exc, errors.DomainError):
        return exc
    if isinstance(exc, sa_exc.TimeoutError):
        return errors.Unavailable("no database connection is free; retry later")
    if isinstance(exc, sa_exc.DBAPIError) and (
        exc.connection_invalidated
        or isinstance(exc, sa_exc.InterfaceError | sa_exc.OperationalError)
    ):
        return errors.Unavailable("the database is unavailable; retry later")
    if isinstance(exc, ConnectionError | OSError):
        return errors.Unavailable("the database is unavailable; retry later")
    return None


async def abort_for(exc: BaseException, context: Context) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        return  # the handler already chose a status
    error = as_domain_error(exc)
    if error is not None:
        await context.abort_with_status(  # type: ignore[attr-defined]
            to_status(error)
        )
    incident = uuid.uuid4().hex[:12]
    log.exception("unhandled error (incident %s)", incident)
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (incident {incident})",
        details=[_packed(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))],
    )
    await context.abort_with_status(  # type: ignore[attr-defined]
        rpc_status.to_status(status)
    )


class ErrorInterceptor(Interceptor):
    """Maps whatever a servicer raises to a deliberate status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, abort_for)
