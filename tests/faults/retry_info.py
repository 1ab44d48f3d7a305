"""What an UNAVAILABLE answer must carry for a client to retry well: the reason (ErrorInfo)
and a RetryInfo delay. The fault tests check both, not only the code."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from tests.rpc import failure_of


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """RetryInfo.retry_delay in seconds, if the status carries one."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def retry_hint(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str | None, bool]:
    """(code, ErrorInfo reason, whether a positive RetryInfo delay came with it)."""
    delay = retry_delay(error)
    return error.code(), failure_of(error).reason, delay is not None and delay > 0


DATABASE_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", True)
