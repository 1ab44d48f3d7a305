"""The one place that turns exceptions into gRPC status: domain errors keep their code and
reason; database outages become UNAVAILABLE; anything else is INTERNAL with a generic message
(the stack trace goes to the log only)."""

from __future__ import annotations

import logging

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service import errors
from service.api.context import Context
from service.api.interceptors.decoding import decode_in_handler
from service.api.interceptors.wrapping import Handler, WrappingInterceptor, wrap_handler
from service.api.status import DOMAIN, packed, status_message
from service.app.failures import as_domain_error
from service.observability.request_id import current_request_id, new_request_id

log = logging.getLogger(__name__)


def to_status(error: errors.DomainError) -> grpc.Status:
    return rpc_status.to_status(status_message(error))


async def abort_with(context: Context, status: grpc.Status) -> None:
    """Abort with a rich status, keeping trailers set earlier (the x-request-id echo), which
    abort_with_status alone would replace."""
    trailers = (*(context.trailing_metadata() or ()), *status.trailing_metadata)
    await context.abort(status.code, status.details, trailing_metadata=trailers)


async def abort_for(exc: BaseException, context: Context) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        return  # the handler already chose a status
    error = as_domain_error(exc)
    if error is not None:
        await abort_with(context, to_status(error))
    # The client gets the request id, never the exception: its text may hold SQL or values.
    request_id = current_request_id() or new_request_id()
    log.exception("unhandled error (request id %s)", request_id)
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (request id {request_id})",
        details=[packed(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))],
    )
    await abort_with(context, rpc_status.to_status(status))


class ErrorInterceptor(WrappingInterceptor):
    """Maps whatever a servicer raises to a deliberate status."""

    def wrap(self, method: str, handler: Handler) -> Handler:
        return wrap_handler(decode_in_handler(handler), abort_for)
