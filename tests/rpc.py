"""Helpers to call RPCs and read the rich error status (ErrorInfo, BadRequest) of a failure."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2, status_pb2
from shop.v1 import (
    account_service_pb2,
    change_feed_service_pb2,
    order_service_pb2,
    user_service_pb2,
)

# Every shop.v1 method by its full path, from the generated descriptors: what the per-method
# table (service/api/methods.py) must classify, derived here rather than from that table.
SHOP_RPCS: dict[str, MethodDescriptor] = {
    f"/{service.full_name}/{method.name}": method
    for module in (
        user_service_pb2,
        order_service_pb2,
        account_service_pb2,
        change_feed_service_pb2,
    )
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}


@dataclass
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    violations: dict[str, str] = field(default_factory=dict)


def failure_of(error: grpc.aio.AioRpcError) -> RpcFailure:
    failure = RpcFailure(code=error.code(), message=error.details() or "")
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                failure.reason, failure.domain = info.reason, info.domain
                failure.metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                failure.violations = {v.field: v.description for v in bad.field_violations}
    return failure


async def rpc_fails(call: Awaitable[Any]) -> RpcFailure:
    """Await a unary call that must fail; return what the status said."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return failure_of(caught.value)


async def stream_fails(call: Any) -> RpcFailure:
    """Drain a server stream that must fail; return what the status said."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return failure_of(caught.value)
