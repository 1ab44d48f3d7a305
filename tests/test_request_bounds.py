"""The worst requests SHOP_MAX_MESSAGE_BYTES (16 MiB) lets through, sent to a real `serve`
process by a default grpc client (no raised metadata or message limits): each answers
INVALID_ARGUMENT naming the field, and the server's peak RSS (VmHWM) grows by less than
PEAK_GROWTH_BOUND.

The requests are built as bytes: millions of empty repeated elements (2 bytes each on the wire)
are what costs a server most per byte, in protobuf's parse (40-110 bytes of objects an element)
and in whatever the handler built per element.

Bound: 128 MiB (issue 19 asked for at most 256 MB). Measured VmHWM growth, before -> after
(2 cores, PostgreSQL 15, grpcio 1.85, protobuf 7.36 upb):
- UpdateUser, 2M one-character unknown paths (6 MB, the review's request): 1900 -> 17 MiB
- UpdateUser, 16 MiB of empty paths (8.4M): not run before (4x the paths above) -> 48 MiB
- UpdateUser, 16 MiB of empty user.orders: 930 -> 48 MiB
- UpsertUsers, 16 MiB of empty users: 663 -> 48 MiB
- ImportUsers, one 16 MiB message of empty users: -> 48 MiB
- CreateOrder, 16 MiB of empty items: 2017 -> 48 MiB
- BatchTransfer, 16 MiB of empty requests: 601 -> 48 MiB
- UpdateUser, 1 MiB of empty user.orders (under the walk threshold, parsed): -> 58 MiB
- ImportUsers, one 1 MiB message of 524,280 users (the handler's len() bound): -> 42 MiB
- UpsertUsers, 1000 rows wrong in every field (10 MB): 35 -> 33 MiB, and RESOURCE_EXHAUSTED
  (62,685 bytes of trailers) -> INVALID_ARGUMENT with 10 violations
- BatchTransfer, 1000 invalid items (answered item by item): -> 27 MiB
The ~48 MiB of a 16 MiB request is the request itself, held by grpc and as Python bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import user_service_pb2 as api

from service.api.interceptors.element_budget import SCAN_ABOVE_BYTES
from tests import wire
from tests.process import service_process
from tests.rpc import failure_of

pytestmark = pytest.mark.timeout(120)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # SHOP_MAX_MESSAGE_BYTES' default
MIB = 1024 * 1024
# For one request, whatever it holds (see the docstring for what was measured).
PEAK_GROWTH_BOUND = 128 * MIB


def _repeated_empty(number: int, size: int) -> bytes:
    """As many empty elements of a repeated field as fit in `size` bytes."""
    empty = wire.field(number, b"")
    return empty * (size // len(empty))


def _nested(path: tuple[int, ...], leaf: bytes) -> bytes:
    """`leaf` inside the messages that `path` (field numbers, outermost first) names."""
    for number in reversed(path):
        leaf = wire.field(number, leaf)
    return leaf


def _fill(path: tuple[int, ...], repeated: int) -> bytes:
    """A request whose field at `path` + `repeated` holds as many empty elements as fit in
    MAX_MESSAGE_BYTES (room left for the enclosing fields' headers)."""
    raw = _nested(path, _repeated_empty(repeated, MAX_MESSAGE_BYTES - 8 * len(path) - 16))
    assert len(raw) <= MAX_MESSAGE_BYTES
    return raw


def _vm_hwm(pid: int) -> int:
    """The process's peak resident set size, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@dataclass
class Server:
    pid: int
    channel: grpc.aio.Channel

    async def call(self, method: str, raw: bytes) -> grpc.aio.AioRpcError:
        """Send `raw` as the request of `method` (ImportUsers: its one message); the call must
        fail."""
        try:
            if method == IMPORT_USERS:
                await self.channel.stream_unary(method)(_one(raw), timeout=60)
            else:
                await self.channel.unary_unary(method)(raw, timeout=60)  # bytes in, bytes out
        except grpc.aio.AioRpcError as error:
            return error
        raise AssertionError(f"{method} succeeded")


async def _one(raw: bytes) -> AsyncIterator[bytes]:
    yield raw


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    """A `serve` process of its own (a peak RSS is the process's whole life) and a channel with
    grpc's default options: no raised metadata or message limits."""
    with service_process(database_url, tmp_path / "serve.log") as (address, process):
        async with grpc.aio.insecure_channel(address) as channel:
            yield Server(process.pid, channel)


async def _peak_growth(
    server: Server, method: str, small: bytes, large: bytes
) -> tuple[int, grpc.aio.AioRpcError]:
    """VmHWM's growth over `large`, after `small` (the same kind of bad request) has warmed up
    the method's code path, so imports and first-call caches are not counted."""
    await server.call(method, small)
    before = _vm_hwm(server.pid)
    error = await server.call(method, large)
    return _vm_hwm(server.pid) - before, error


# Field numbers, from protos/shop/v1/*.proto.
UPDATE_USER = "/shop.v1.UserService/UpdateUser"  # user = 1 (User.orders = 10), update_mask = 2
UPSERT_USERS = "/shop.v1.UserService/UpsertUsers"  # users = 1
IMPORT_USERS = "/shop.v1.UserService/ImportUsers"  # users = 1, per message
CREATE_ORDER = "/shop.v1.OrderService/CreateOrder"  # items = 2
BATCH_TRANSFER = "/shop.v1.AccountService/BatchTransfer"  # requests = 1
# Method, the path to the repeated field's message, the field's number, the field's name.
FLOODS = {
    # 8.4M empty strings: upb alone holds 256 MB for them, and the handler made a violation each.
    "UpdateUser paths": (UPDATE_USER, (2,), 1, "update_mask.paths"),
    # 8.4M empty orders inside the user: 897 MB in upb's parse alone.
    "UpdateUser orders": (UPDATE_USER, (1,), 10, "user.orders"),
    "UpsertUsers": (UPSERT_USERS, (), 1, "users"),
    "ImportUsers": (IMPORT_USERS, (), 1, "users"),
    "CreateOrder": (CREATE_ORDER, (), 2, "items"),
    "BatchTransfer": (BATCH_TRANSFER, (), 1, "requests"),
}


@pytest.mark.parametrize(("method", "path", "number", "field"), FLOODS.values(), ids=FLOODS)
async def test_a_message_full_of_empty_elements_is_refused_within_the_bound(
    server: Server, method: str, path: tuple[int, ...], number: int, field: str
) -> None:
    small = _nested(path, wire.field(number, b"") * 2_000)
    growth, error = await _peak_growth(server, method, small, _fill(path, number))
    print(f"{method} {field} flood: VmHWM +{growth / MIB:.1f} MiB")
    failure = failure_of(error)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in failure.violations
    assert growth < PEAK_GROWTH_BOUND


async def test_a_request_just_under_the_walk_threshold_is_parsed_within_the_bound(
    server: Server,
) -> None:
    # Not walked (element_budget.SCAN_ABOVE_BYTES): protobuf parses all of it. Empty orders in
    # the user cost upb the most per byte; UpdateUser never reads them.
    raw = _nested((1,), _repeated_empty(10, SCAN_ABOVE_BYTES - 16))
    small = _nested((1,), _repeated_empty(10, 4_000))
    growth, error = await _peak_growth(server, UPDATE_USER, small, raw)
    print(f"UpdateUser, {len(raw) // 2:,} empty orders: VmHWM +{growth / MIB:.1f} MiB")
    assert failure_of(error).code == grpc.StatusCode.INVALID_ARGUMENT
    assert growth < PEAK_GROWTH_BOUND


async def test_import_users_message_past_its_row_bound_is_refused(server: Server) -> None:
    # Under the walk threshold: the handler's own bound answers, by len().
    raw = _repeated_empty(1, SCAN_ABOVE_BYTES - 16)
    growth, error = await _peak_growth(server, IMPORT_USERS, raw[:4_000], raw)
    print(f"ImportUsers, one message of {len(raw) // 2:,} users: VmHWM +{growth / MIB:.1f} MiB")
    failure = failure_of(error)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.violations == {"batch[0].users": "at most 10,000 users per message"}
    assert growth < PEAK_GROWTH_BOUND


async def test_update_user_with_2m_unknown_mask_paths_is_refused_within_the_bound(
    server: Server,
) -> None:
    # The security review's request: 6 MB, 2M paths of one character.
    def request(paths: int) -> bytes:
        return wire.field(1, wire.field(1, b"\x01")) + wire.field(2, wire.field(1, b"x") * paths)

    growth, error = await _peak_growth(server, UPDATE_USER, request(1_000), request(2_000_000))
    print(f"UpdateUser, 2M unknown paths: VmHWM +{growth / MIB:.1f} MiB")
    failure = failure_of(error)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask.paths" in failure.violations
    assert growth < PEAK_GROWTH_BOUND


def _bad_rows(count: int) -> bytes:
    """UpsertUsers with `count` rows, each wrong in all three fields, with long values."""
    users = [
        api.UpsertUser(email=f"{i}" + "x" * 5_000, first_name="\u202e" * 1_500, last_name="")
        for i in range(count)
    ]
    return api.UpsertUsersRequest(users=users).SerializeToString()


async def test_upsert_users_with_1000_invalid_rows_answers_capped_violations(
    server: Server,
) -> None:
    growth, error = await _peak_growth(server, UPSERT_USERS, _bad_rows(10), _bad_rows(1_000))
    print(f"UpsertUsers, 1000 invalid rows: VmHWM +{growth / MIB:.1f} MiB")
    failure = failure_of(error)
    # A default client reads the whole status: not RESOURCE_EXHAUSTED for oversized trailers.
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.violations) == [
        "users[0].email",
        "users[0].first_name",
        "users[0].last_name",
        "users[1].email",
        "users[1].first_name",
        "users[1].last_name",
        "users[2].email",
        "users[2].first_name",
        "users[2].last_name",
        "users[3].email",
    ]
    assert failure.metadata == {"omitted_violations": "2990"}
    assert failure.message.endswith("and 2,990 more")
    assert growth < PEAK_GROWTH_BOUND


async def test_batch_transfer_of_1000_invalid_items_answers_each_within_the_bound(
    server: Server,
) -> None:
    # Refused items are answered in the response, one status each (5 violations at most).
    def request(count: int) -> bytes:
        bad = accounts_api.TransferRequest(amount="x" * 5_000, request_id="\u202e" * 1_500)
        return accounts_api.BatchTransferRequest(requests=[bad] * count).SerializeToString()

    rpc = server.channel.unary_unary(
        BATCH_TRANSFER, response_deserializer=accounts_api.BatchTransferResponse.FromString
    )
    await rpc(request(10), timeout=60)
    before = _vm_hwm(server.pid)
    response = await rpc(request(1_000), timeout=60)
    growth = _vm_hwm(server.pid) - before
    print(f"BatchTransfer, 1000 invalid items: VmHWM +{growth / MIB:.1f} MiB")
    assert len(response.results) == 1_000
    last = response.results[-1].error
    assert last.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert last.message == (
        "invalid request: requests[999].from_account_id, requests[999].to_account_id, "
        "requests[999].amount, requests[999].request_id"
    )
    assert growth < PEAK_GROWTH_BOUND
