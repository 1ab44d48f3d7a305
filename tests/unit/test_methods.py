"""The per-method table (service/api/methods.py) against the contract: every shop.v1 method has
a row, and a row says idempotent exactly when its request carries a request_id."""

from __future__ import annotations

from google.protobuf.descriptor import MethodDescriptor

from service.api.methods import METHODS, READ, ROUTES, WRITE
from tests.rpc import SHOP_RPCS

RPCS: dict[str, MethodDescriptor] = SHOP_RPCS


def _carries_a_request_id(method: MethodDescriptor) -> bool:
    fields = method.input_type.fields_by_name
    if "request_id" in fields:
        return True
    # BatchTransfer: each item is a TransferRequest with its own request_id.
    return any(
        f.message_type is not None and "request_id" in f.message_type.fields_by_name
        for f in fields.values()
    )


def test_every_rpc_has_exactly_one_row() -> None:
    assert set(METHODS) == set(RPCS)


def test_idempotent_exactly_when_the_request_carries_a_request_id() -> None:
    idempotent = {name for name, method in METHODS.items() if method.idempotent}
    assert idempotent == {name for name, rpc in RPCS.items() if _carries_a_request_id(rpc)}
    assert idempotent  # not vacuous


def test_reads_are_the_get_list_and_stream_calls_and_only_they_have_a_route() -> None:
    for name, method in METHODS.items():
        verb = name.rsplit("/", 1)[1]
        expected = READ if verb.startswith(("Get", "List", "Stream", "Watch")) else WRITE
        assert method.role is expected, name
    assert set(ROUTES) == {name for name, method in METHODS.items() if method.role is READ}
