"""AccountService.BatchTransfer over a real channel: one result per item, in order, each applied
or refused on its own and idempotent by its own request_id."""

from __future__ import annotations

from decimal import Decimal

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from shop.v1 import account_service_pb2 as api
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Account, Transfer
from tests.factories import Factory
from tests.ids import rid
from tests.ledger import assert_ledger_balances
from tests.rpc import rpc_fails


def transfer(source: int, target: int, amount: str, request_id: str = "") -> api.TransferRequest:
    return api.TransferRequest(
        from_account_id=source,
        to_account_id=target,
        amount=amount,
        request_id=request_id or rid(),
    )


def reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError(f"no ErrorInfo in {status}")


def violations(status: status_pb2.Status) -> dict[str, str]:
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    return {}


async def balance(engine: AsyncEngine, account_id: int) -> Decimal:
    async with engine.connect() as conn:
        value = await conn.scalar(select(Account.balance).where(Account.id == account_id))
    assert value is not None
    return value


async def test_each_item_gets_its_own_result_in_order(
    account_stub, factory: Factory, sessions, engine: AsyncEngine
) -> None:
    a = await factory.account(balance="10.00")
    b = await factory.account()
    usd = await factory.account(currency="USD")
    response = await account_stub.BatchTransfer(
        api.BatchTransferRequest(
            requests=[
                transfer(a.id, b.id, "3.00"),
                transfer(a.id, b.id, "-1"),  # invalid: that item's INVALID_ARGUMENT only
                transfer(a.id, b.id, "8.00"),  # 7.00 left: refused
                transfer(a.id, usd.id, "1.00"),
                transfer(a.id, 424_242, "1.00"),
                transfer(a.id, b.id, "7.00"),  # exactly what is left
            ]
        )
    )

    results = response.results
    assert [r.WhichOneof("result") for r in results] == [
        "transfer",
        "error",
        "error",
        "error",
        "error",
        "transfer",
    ]
    assert results[0].transfer.amount == "3.00"
    assert results[5].transfer.amount == "7.00"
    assert results[0].transfer.id != results[5].transfer.id
    assert results[1].error.code == code_pb2.INVALID_ARGUMENT
    assert reason(results[1].error) == "INVALID_ARGUMENT"
    assert set(violations(results[1].error)) == {"requests[1].amount"}
    assert [(r.error.code, reason(r.error)) for r in results[2:5]] == [
        (code_pb2.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"),
        (code_pb2.FAILED_PRECONDITION, "CURRENCY_MISMATCH"),
        (code_pb2.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    ]
    assert await balance(engine, a.id) == Decimal("0.00")
    assert await balance(engine, b.id) == Decimal("10.00")
    await assert_ledger_balances(sessions)


async def test_a_repeated_batch_answers_from_stored_results_and_moves_nothing_again(
    account_stub, factory: Factory, engine: AsyncEngine
) -> None:
    a = await factory.account(balance="10.00")
    b = await factory.account()
    request = api.BatchTransferRequest(
        requests=[transfer(a.id, b.id, "1.00"), transfer(a.id, b.id, "2.00")]
    )
    first = await account_stub.BatchTransfer(request)
    again = await account_stub.BatchTransfer(request)

    assert again == first
    assert await balance(engine, a.id) == Decimal("7.00")
    # A batch item and a unary Transfer with the same request_id are the same request.
    unary = await account_stub.Transfer(request.requests[1])
    assert unary == first.results[1].transfer
    assert await balance(engine, b.id) == Decimal("3.00")


async def test_request_ids_reused_inside_a_batch_and_across_calls(
    account_stub, factory: Factory, sessions, engine: AsyncEngine
) -> None:
    a = await factory.account(balance="10.00")
    b = await factory.account()
    done = await account_stub.Transfer(transfer(a.id, b.id, "1.00", "paid-before"))
    response = await account_stub.BatchTransfer(
        api.BatchTransferRequest(
            requests=[
                transfer(a.id, b.id, "2.00", "twice"),
                transfer(a.id, b.id, "2.00", "twice"),  # the same request: the same transfer
                transfer(a.id, b.id, "3.00", "twice"),  # another amount: reused
                transfer(a.id, b.id, "1.00", "paid-before"),  # as sent before: stored answer
                transfer(a.id, b.id, "5.00", "paid-before"),  # another amount: reused
            ]
        )
    )

    results = response.results
    assert results[0].transfer.amount == "2.00"
    assert results[1].transfer == results[0].transfer
    assert reason(results[2].error) == "REQUEST_ID_REUSED"
    assert results[2].error.code == code_pb2.ALREADY_EXISTS
    assert results[3].transfer == done
    assert reason(results[4].error) == "REQUEST_ID_REUSED"
    assert await balance(engine, a.id) == Decimal("7.00")
    async with sessions() as session:
        twice = await session.scalar(
            select(func.count()).select_from(Transfer).where(Transfer.request_id == "twice")
        )
    assert twice == 1


async def test_a_request_id_used_by_another_method_is_reused(
    account_stub, factory: Factory
) -> None:
    a = await factory.account(balance="10.00")
    b = await factory.account()
    await account_stub.Deposit(api.DepositRequest(account_id=a.id, amount="1.00", request_id="d"))
    response = await account_stub.BatchTransfer(
        api.BatchTransferRequest(requests=[transfer(a.id, b.id, "1.00", "d")])
    )
    assert reason(response.results[0].error) == "REQUEST_ID_REUSED"


async def test_a_thousand_transfers_in_one_call(
    account_stub, factory: Factory, sessions, engine: AsyncEngine
) -> None:
    accounts = [await factory.account(balance="100.00") for _ in range(10)]
    requests = [
        transfer(accounts[n % 10].id, accounts[(n * 7 + 3) % 10].id, "0.10")
        for n in range(1000)
        if n % 10 != (n * 7 + 3) % 10
    ]
    response = await account_stub.BatchTransfer(api.BatchTransferRequest(requests=requests))

    assert len(response.results) == len(requests)
    assert all(r.WhichOneof("result") == "transfer" for r in response.results)
    assert [r.transfer.request_id for r in response.results] == [r.request_id for r in requests]
    total = sum([await balance(engine, a.id) for a in accounts], Decimal(0))
    assert total == Decimal("1000.00")
    await assert_ledger_balances(sessions)


async def test_an_empty_or_oversized_batch_is_invalid(account_stub) -> None:
    empty = await rpc_fails(account_stub.BatchTransfer(api.BatchTransferRequest()))
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(empty.violations) == {"requests"}
    oversized = api.BatchTransferRequest(requests=[transfer(1, 2, "1.00") for _ in range(1001)])
    too_many = await rpc_fails(account_stub.BatchTransfer(oversized))
    assert too_many.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(too_many.violations) == {"requests"}
