"""One request of each kind the load generator sends. A workload is built once per client
process from its name and picklable parameters, then called by every in-flight worker."""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from shop.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)

from bench import echo

Call = Callable[[], Awaitable[object]]
Params = dict[str, Any]

# About the size of a serialized User, so echo moves as many bytes as GetUser answers with.
ECHO_PAYLOAD = b"u" * 120


def echo_call(channel: grpc.aio.Channel, params: Params, client: int) -> Call:
    # No (de)serializers: bytes travel as they are, like the echo server's.
    method = channel.unary_unary(echo.METHOD, None, None)

    def call() -> Awaitable[object]:
        return method(ECHO_PAYLOAD)

    return call


def get_user(channel: grpc.aio.Channel, params: Params, client: int) -> Call:
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    rng = random.Random(client)
    max_id = int(params["max_id"])

    def call() -> Awaitable[object]:
        return stub.GetUser(user_service_pb2.GetUserRequest(id=rng.randint(1, max_id)))

    return call


def create_user(channel: grpc.aio.Channel, params: Params, client: int) -> Call:
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    # A fresh run token keeps emails unique across points and client processes.
    run = uuid.uuid4().hex[:8]
    counter = iter(range(1 << 62))

    def call() -> Awaitable[object]:
        n = next(counter)
        return stub.CreateUser(
            user_service_pb2.CreateUserRequest(
                email=f"new-{run}-{client}-{n}@bench.example", first_name="Bench", last_name=str(n)
            )
        )

    return call


def transfer(channel: grpc.aio.Channel, params: Params, client: int) -> Call:
    stub = account_service_pb2_grpc.AccountServiceStub(channel)
    rng = random.Random(client)
    accounts: list[int] = list(params["accounts"])

    def call() -> Awaitable[object]:
        source, destination = rng.sample(accounts, 2)
        return stub.Transfer(
            account_service_pb2.TransferRequest(
                from_account_id=source,
                to_account_id=destination,
                amount="1.00",
                request_id=uuid.uuid4().hex,
            )
        )

    return call


class ItemErrors(Exception):
    """A BatchTransfer call whose items were not all applied; load.py counts it as an error
    named for the items' reasons."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(", ".join(reasons))
        self.name = "ITEMS:" + "+".join(sorted(set(reasons)))


def batch_transfer(channel: grpc.aio.Channel, params: Params, client: int) -> Call:
    """BatchTransfer of `size` transfers of 1.00 between random distinct accounts, each with a
    fresh request_id; a call with any item refused raises ItemErrors."""
    stub = account_service_pb2_grpc.AccountServiceStub(channel)
    rng = random.Random(client)
    accounts: list[int] = list(params["accounts"])
    size = int(params["size"])

    async def call() -> object:
        requests = []
        for _ in range(size):
            source, destination = rng.sample(accounts, 2)
            requests.append(
                account_service_pb2.TransferRequest(
                    from_account_id=source,
                    to_account_id=destination,
                    amount="1.00",
                    request_id=uuid.uuid4().hex,
                )
            )
        response = await stub.BatchTransfer(
            account_service_pb2.BatchTransferRequest(requests=requests)
        )
        refused = [_reason(r.error) for r in response.results if r.WhichOneof("result") == "error"]
        if refused or len(response.results) != size:
            raise ItemErrors(refused or ["MISSING_RESULTS"])
        return response

    return call


def _reason(status: Any) -> str:
    """The ErrorInfo reason of a google.rpc.Status, else its code."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return f"code {status.code}"


WORKLOADS: dict[str, Callable[[grpc.aio.Channel, Params, int], Call]] = {
    "echo": echo_call,
    "GetUser": get_user,
    "CreateUser": create_user,
    "Transfer": transfer,
    "BatchTransfer": batch_transfer,
}
