"""AccountService over the real channel: validation, money arithmetic, idempotency, paging."""

from __future__ import annotations

from decimal import Decimal

import grpc
import pytest
from shop.v1 import account_service_pb2 as api
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db.models import Account, IdempotencyKey, Transfer
from tests.factories import OPENING_PREFIX, Factory
from tests.ids import rid
from tests.ledger import customer_transfers
from tests.rpc import RpcFailure, rpc_fails, stream_fails

MISSING_ID = 987654321


async def balance_of(sessions: async_sessionmaker[AsyncSession], account_id: int) -> Decimal:
    async with sessions() as session:
        balance = await session.scalar(select(Account.balance).where(Account.id == account_id))
    assert balance is not None
    return balance


async def count_rows(sessions: async_sessionmaker[AsyncSession], model: type) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def count_keys(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Idempotency keys of the test's own calls: the factory's opening deposits are left out."""
    async with sessions() as session:
        stmt = select(func.count()).where(~IdempotencyKey.request_id.startswith(OPENING_PREFIX))
        return int(await session.scalar(stmt) or 0)


async def transfer_rows(sessions: async_sessionmaker[AsyncSession]) -> list[Transfer]:
    """Transfers between customers: the factory's opening deposits are left out."""
    async with sessions() as session:
        return list((await session.scalars(customer_transfers().order_by(Transfer.id))).all())


def assert_invalid(failure: RpcFailure, field: str) -> None:
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_ARGUMENT"
    assert failure.domain == "shop.v1"
    assert field in failure.violations, failure.violations
    assert failure.violations[field]


def assert_failure(failure: RpcFailure, code: grpc.StatusCode, reason: str) -> None:
    assert failure.code == code, failure
    assert failure.reason == reason, failure
    assert failure.domain == "shop.v1"


# --- OpenAccount -------------------------------------------------------------------------


async def test_open_account(account_stub, factory: Factory, sessions) -> None:
    user = await factory.user()
    account = await account_stub.OpenAccount(
        api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=rid())
    )
    assert account.id > 0
    assert account.user_id == user.id
    assert account.currency == "EUR"
    assert account.balance == "0.00"
    assert account.HasField("created_at")
    assert account.HasField("updated_at")
    async with sessions() as session:
        row = await session.get(Account, account.id)
    assert row is not None
    assert (row.user_id, row.currency, row.balance) == (user.id, "EUR", Decimal("0.00"))


@pytest.mark.parametrize("currency", ["eur", "EURO", "", "EU", "E1R"])
async def test_open_account_rejects_bad_currency(
    account_stub, factory: Factory, sessions, currency: str
) -> None:
    user = await factory.user()
    failure = await rpc_fails(
        account_stub.OpenAccount(
            api.OpenAccountRequest(user_id=user.id, currency=currency, request_id=rid())
        )
    )
    assert_invalid(failure, "currency")
    assert await count_rows(sessions, Account) == 0


async def test_open_account_collects_every_violation(account_stub) -> None:
    failure = await rpc_fails(account_stub.OpenAccount(api.OpenAccountRequest()))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(failure.violations) == {"user_id", "currency", "request_id"}


async def test_open_account_unknown_user(account_stub, sessions) -> None:
    failure = await rpc_fails(
        account_stub.OpenAccount(
            api.OpenAccountRequest(user_id=MISSING_ID, currency="EUR", request_id=rid())
        )
    )
    assert_failure(failure, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    assert await count_rows(sessions, Account) == 0


async def test_open_account_for_deleted_user(account_stub, factory: Factory, sessions) -> None:
    user = await factory.user(deleted=True)
    failure = await rpc_fails(
        account_stub.OpenAccount(
            api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=rid())
        )
    )
    assert_failure(failure, grpc.StatusCode.FAILED_PRECONDITION, "USER_DELETED")
    assert await count_rows(sessions, Account) == 0


@pytest.mark.parametrize("request_id", ["", "has space", "x" * 129, "ünï"])
async def test_open_account_requires_a_valid_request_id(
    account_stub, factory: Factory, sessions, request_id: str
) -> None:
    user = await factory.user()
    failure = await rpc_fails(
        account_stub.OpenAccount(
            api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=request_id)
        )
    )
    assert_invalid(failure, "request_id")
    assert await count_rows(sessions, Account) == 0


async def test_open_account_is_idempotent(account_stub, factory: Factory, sessions) -> None:
    user = await factory.user()
    request = api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=rid())
    first = await account_stub.OpenAccount(request)
    second = await account_stub.OpenAccount(request)
    assert second == first
    assert await count_rows(sessions, Account) == 1


async def test_open_account_request_id_reused_for_other_currency(
    account_stub, factory: Factory, sessions
) -> None:
    user = await factory.user()
    request_id = rid()
    await account_stub.OpenAccount(
        api.OpenAccountRequest(user_id=user.id, currency="EUR", request_id=request_id)
    )
    failure = await rpc_fails(
        account_stub.OpenAccount(
            api.OpenAccountRequest(user_id=user.id, currency="USD", request_id=request_id)
        )
    )
    assert_failure(failure, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await count_rows(sessions, Account) == 1


# --- GetAccount --------------------------------------------------------------------------


async def test_get_account(account_stub, factory: Factory) -> None:
    account = await factory.account(currency="USD", balance="12.30")
    got = await account_stub.GetAccount(api.GetAccountRequest(id=account.id))
    assert got.id == account.id
    assert got.user_id == account.user_id
    assert got.currency == "USD"
    assert got.balance == "12.30"


async def test_get_account_after_open_matches(account_stub, factory: Factory) -> None:
    user = await factory.user()
    opened = await account_stub.OpenAccount(
        api.OpenAccountRequest(user_id=user.id, currency="GBP", request_id=rid())
    )
    assert await account_stub.GetAccount(api.GetAccountRequest(id=opened.id)) == opened


async def test_get_account_not_found(account_stub) -> None:
    failure = await rpc_fails(account_stub.GetAccount(api.GetAccountRequest(id=MISSING_ID)))
    assert_failure(failure, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


@pytest.mark.parametrize("account_id", [0, -5])
async def test_get_account_rejects_non_positive_id(account_stub, account_id: int) -> None:
    failure = await rpc_fails(account_stub.GetAccount(api.GetAccountRequest(id=account_id)))
    assert_invalid(failure, "id")


# --- Deposit / Withdraw ------------------------------------------------------------------


async def test_deposit_is_exact_decimal(account_stub, factory: Factory, sessions) -> None:
    account = await factory.account()
    first = await account_stub.Deposit(
        api.DepositRequest(account_id=account.id, amount="0.10", request_id=rid())
    )
    assert first.balance == "0.10"
    second = await account_stub.Deposit(
        api.DepositRequest(account_id=account.id, amount="0.20", request_id=rid())
    )
    assert second.balance == "0.30"
    assert second.id == account.id
    assert await balance_of(sessions, account.id) == Decimal("0.30")


async def test_deposit_normalises_to_two_digits(account_stub, factory: Factory) -> None:
    account = await factory.account()
    reply = await account_stub.Deposit(
        api.DepositRequest(account_id=account.id, amount="5", request_id=rid())
    )
    assert reply.balance == "5.00"
    reply = await account_stub.Deposit(
        api.DepositRequest(account_id=account.id, amount="0.5", request_id=rid())
    )
    assert reply.balance == "5.50"


async def test_deposit_accepts_the_largest_amount(account_stub, factory: Factory) -> None:
    account = await factory.account()
    reply = await account_stub.Deposit(
        api.DepositRequest(account_id=account.id, amount="9999999999999999.99", request_id=rid())
    )
    assert reply.balance == "9999999999999999.99"


async def test_deposit_past_the_balance_limit(account_stub, factory: Factory, sessions) -> None:
    account = await factory.account(balance="9999999999999999.00")
    failure = await rpc_fails(
        account_stub.Deposit(
            api.DepositRequest(account_id=account.id, amount="1.00", request_id=rid())
        )
    )
    assert_failure(failure, grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED")
    assert await balance_of(sessions, account.id) == Decimal("9999999999999999.00")
    assert await count_keys(sessions) == 0


async def test_withdraw_is_exact_decimal(account_stub, factory: Factory, sessions) -> None:
    account = await factory.account(balance="1.00")
    reply = await account_stub.Withdraw(
        api.WithdrawRequest(account_id=account.id, amount="0.70", request_id=rid())
    )
    assert reply.balance == "0.30"
    reply = await account_stub.Withdraw(
        api.WithdrawRequest(account_id=account.id, amount="0.30", request_id=rid())
    )
    assert reply.balance == "0.00"
    assert await balance_of(sessions, account.id) == Decimal("0.00")


async def test_withdraw_insufficient_funds_changes_nothing(
    account_stub, factory: Factory, sessions
) -> None:
    account = await factory.account(balance="10.00")
    failure = await rpc_fails(
        account_stub.Withdraw(
            api.WithdrawRequest(account_id=account.id, amount="10.01", request_id=rid())
        )
    )
    assert_failure(failure, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert await balance_of(sessions, account.id) == Decimal("10.00")
    assert await count_keys(sessions) == 0


BAD_AMOUNTS = [
    "0",
    "0.00",
    "-1",
    "1.234",
    "1e3",
    "abc",
    "",
    " 1",
    "1.",
    ".5",
    "+1",
    "NaN",
    "1,50",
    "12345678901234567",  # 17 integer digits: more than NUMERIC(18, 2) holds
    "\u0661\u0662",  # Arabic-Indic "12": digits, but not ASCII ones
    "\uff11.\uff15",  # fullwidth "1.5"
]


def money_call(
    account_stub, method: str, account: Account, amount: str, request_id: str
) -> grpc.aio.UnaryUnaryCall:
    """One Deposit, Withdraw or OpenAccount (for the account's owner; `amount` unused)."""
    if method == "OpenAccount":
        return account_stub.OpenAccount(
            api.OpenAccountRequest(user_id=account.user_id, currency="EUR", request_id=request_id)
        )
    request_type = {"Deposit": api.DepositRequest, "Withdraw": api.WithdrawRequest}[method]
    request = request_type(account_id=account.id, amount=amount, request_id=request_id)
    return getattr(account_stub, method)(request)


@pytest.mark.parametrize("method", ["Deposit", "Withdraw"])
@pytest.mark.parametrize("amount", BAD_AMOUNTS)
async def test_money_call_rejects_bad_amount(
    account_stub, factory: Factory, sessions, method: str, amount: str
) -> None:
    account = await factory.account(balance="5.00")
    failure = await rpc_fails(money_call(account_stub, method, account, amount, rid()))
    assert_invalid(failure, "amount")
    assert await balance_of(sessions, account.id) == Decimal("5.00")


async def test_deposit_unknown_account(account_stub, sessions) -> None:
    failure = await rpc_fails(
        account_stub.Deposit(
            api.DepositRequest(account_id=MISSING_ID, amount="1.00", request_id=rid())
        )
    )
    assert_failure(failure, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert await count_keys(sessions) == 0


async def test_withdraw_unknown_account(account_stub) -> None:
    failure = await rpc_fails(
        account_stub.Withdraw(
            api.WithdrawRequest(account_id=MISSING_ID, amount="1.00", request_id=rid())
        )
    )
    assert_failure(failure, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_deposit_requires_request_id(account_stub, factory: Factory, sessions) -> None:
    account = await factory.account()
    failure = await rpc_fails(
        account_stub.Deposit(api.DepositRequest(account_id=account.id, amount="1.00"))
    )
    assert_invalid(failure, "request_id")
    assert await balance_of(sessions, account.id) == Decimal("0.00")


async def test_deposit_retry_returns_first_response(
    account_stub, factory: Factory, sessions
) -> None:
    account = await factory.account()
    request = api.DepositRequest(account_id=account.id, amount="10.00", request_id=rid())
    first = await account_stub.Deposit(request)
    assert first.balance == "10.00"
    later = await account_stub.Deposit(
        api.DepositRequest(account_id=account.id, amount="5.00", request_id=rid())
    )
    assert later.balance == "15.00"

    retry = await account_stub.Deposit(request)
    assert retry == first  # the balance right after the first deposit, not "15.00"
    assert await balance_of(sessions, account.id) == Decimal("15.00")
    assert await count_keys(sessions) == 2


async def test_withdraw_retry_returns_first_response(
    account_stub, factory: Factory, sessions
) -> None:
    account = await factory.account(balance="20.00")
    request = api.WithdrawRequest(account_id=account.id, amount="4.00", request_id=rid())
    first = await account_stub.Withdraw(request)
    assert first.balance == "16.00"
    for _ in range(3):
        assert await account_stub.Withdraw(request) == first
    assert await balance_of(sessions, account.id) == Decimal("16.00")


# A request_id names one request: the same id with another amount, account or method (the
# same fields byte for byte, under another method, included) is refused and changes nothing.
# Each call: (method, "first" or "second" account, amount).
@pytest.mark.parametrize(
    ("first", "reuse"),
    [
        pytest.param(("Deposit", "first", "1.00"), ("Deposit", "first", "2.00"), id="amount"),
        pytest.param(("Deposit", "first", "1.00"), ("Deposit", "second", "1.00"), id="account"),
        pytest.param(("Deposit", "first", "3.00"), ("Withdraw", "first", "3.00"), id="method"),
        pytest.param(("OpenAccount", "first", ""), ("Deposit", "second", "1.00"), id="open"),
    ],
)
async def test_request_id_reused_for_another_request(
    account_stub,
    factory: Factory,
    sessions,
    first: tuple[str, str, str],
    reuse: tuple[str, str, str],
) -> None:
    accounts = {"first": await factory.account(), "second": await factory.account()}
    request_id = rid()
    method, name, amount = first
    await money_call(account_stub, method, accounts[name], amount, request_id)
    method, name, amount = reuse
    before = await balance_of(sessions, accounts[name].id)

    failure = await rpc_fails(money_call(account_stub, method, accounts[name], amount, request_id))
    assert_failure(failure, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await balance_of(sessions, accounts[name].id) == before


async def test_failed_withdraw_does_not_burn_request_id(
    account_stub, factory: Factory, sessions
) -> None:
    account = await factory.account(balance="1.00")
    request = api.WithdrawRequest(account_id=account.id, amount="5.00", request_id=rid())
    failure = await rpc_fails(account_stub.Withdraw(request))
    assert_failure(failure, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")

    await account_stub.Deposit(
        api.DepositRequest(account_id=account.id, amount="10.00", request_id=rid())
    )
    retried = await account_stub.Withdraw(request)
    assert retried.balance == "6.00"
    assert await balance_of(sessions, account.id) == Decimal("6.00")
    # And now it is spent: another retry returns the same answer and takes nothing more.
    assert await account_stub.Withdraw(request) == retried
    assert await balance_of(sessions, account.id) == Decimal("6.00")


# --- Transfer ----------------------------------------------------------------------------


async def test_transfer_moves_money_exactly(account_stub, factory: Factory, sessions) -> None:
    source = await factory.account(balance="100.00")
    target = await factory.account(balance="0.05")
    request_id = rid()
    transfer = await account_stub.Transfer(
        api.TransferRequest(
            from_account_id=source.id,
            to_account_id=target.id,
            amount="33.33",
            request_id=request_id,
        )
    )
    assert transfer.id > 0
    assert transfer.from_account_id == source.id
    assert transfer.to_account_id == target.id
    assert transfer.amount == "33.33"
    assert transfer.request_id == request_id
    assert transfer.HasField("created_at")

    assert await balance_of(sessions, source.id) == Decimal("66.67")
    assert await balance_of(sessions, target.id) == Decimal("33.38")
    rows = await transfer_rows(sessions)
    assert len(rows) == 1
    row = rows[0]
    assert row.id == transfer.id
    assert (row.from_account_id, row.to_account_id) == (source.id, target.id)
    assert row.amount == Decimal("33.33")
    assert row.request_id == request_id


async def test_transfer_whole_balance(account_stub, factory: Factory, sessions) -> None:
    source = await factory.account(balance="7.77")
    target = await factory.account()
    await account_stub.Transfer(
        api.TransferRequest(
            from_account_id=source.id, to_account_id=target.id, amount="7.77", request_id=rid()
        )
    )
    assert await balance_of(sessions, source.id) == Decimal("0.00")
    assert await balance_of(sessions, target.id) == Decimal("7.77")


async def test_transfer_to_same_account_is_invalid(
    account_stub, factory: Factory, sessions
) -> None:
    account = await factory.account(balance="10.00")
    failure = await rpc_fails(
        account_stub.Transfer(
            api.TransferRequest(
                from_account_id=account.id,
                to_account_id=account.id,
                amount="1.00",
                request_id=rid(),
            )
        )
    )
    assert_invalid(failure, "to_account_id")
    assert await balance_of(sessions, account.id) == Decimal("10.00")
    assert await transfer_rows(sessions) == []


async def test_transfer_rejects_bad_fields(account_stub) -> None:
    failure = await rpc_fails(
        account_stub.Transfer(api.TransferRequest(from_account_id=0, amount="1.001"))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"from_account_id", "to_account_id", "amount", "request_id"} <= set(failure.violations)


async def test_transfer_currency_mismatch(account_stub, factory: Factory, sessions) -> None:
    source = await factory.account(currency="EUR", balance="10.00")
    target = await factory.account(currency="USD", balance="0.00")
    failure = await rpc_fails(
        account_stub.Transfer(
            api.TransferRequest(
                from_account_id=source.id, to_account_id=target.id, amount="1.00", request_id=rid()
            )
        )
    )
    assert_failure(failure, grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH")
    assert await balance_of(sessions, source.id) == Decimal("10.00")
    assert await balance_of(sessions, target.id) == Decimal("0.00")
    assert await transfer_rows(sessions) == []


async def test_transfer_insufficient_funds_changes_nothing(
    account_stub, factory: Factory, sessions
) -> None:
    source = await factory.account(balance="10.00")
    target = await factory.account(balance="1.00")
    request = api.TransferRequest(
        from_account_id=source.id, to_account_id=target.id, amount="10.01", request_id=rid()
    )
    failure = await rpc_fails(account_stub.Transfer(request))
    assert_failure(failure, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    assert await balance_of(sessions, source.id) == Decimal("10.00")
    assert await balance_of(sessions, target.id) == Decimal("1.00")
    assert await transfer_rows(sessions) == []
    assert await count_keys(sessions) == 0

    # The request_id is not burnt: after a top-up the same request goes through.
    await account_stub.Deposit(
        api.DepositRequest(account_id=source.id, amount="0.01", request_id=rid())
    )
    done = await account_stub.Transfer(request)
    assert done.amount == "10.01"
    assert await balance_of(sessions, source.id) == Decimal("0.00")
    assert await balance_of(sessions, target.id) == Decimal("11.01")


async def test_transfer_past_the_balance_limit(account_stub, factory: Factory, sessions) -> None:
    source = await factory.account(balance="5.00")
    target = await factory.account(balance="9999999999999999.00")
    failure = await rpc_fails(
        account_stub.Transfer(
            api.TransferRequest(
                from_account_id=source.id, to_account_id=target.id, amount="1.00", request_id=rid()
            )
        )
    )
    assert_failure(failure, grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED")
    assert await balance_of(sessions, source.id) == Decimal("5.00")
    assert await balance_of(sessions, target.id) == Decimal("9999999999999999.00")
    assert await transfer_rows(sessions) == []


@pytest.mark.parametrize("missing", ["from", "to"])
async def test_transfer_unknown_account(
    account_stub, factory: Factory, sessions, missing: str
) -> None:
    known = await factory.account(balance="10.00")
    from_id, to_id = (MISSING_ID, known.id) if missing == "from" else (known.id, MISSING_ID)
    failure = await rpc_fails(
        account_stub.Transfer(
            api.TransferRequest(
                from_account_id=from_id, to_account_id=to_id, amount="1.00", request_id=rid()
            )
        )
    )
    assert_failure(failure, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert failure.metadata.get("id") == str(MISSING_ID)
    assert await balance_of(sessions, known.id) == Decimal("10.00")
    assert await transfer_rows(sessions) == []


async def test_transfer_retry_returns_same_transfer(
    account_stub, factory: Factory, sessions
) -> None:
    source = await factory.account(balance="50.00")
    target = await factory.account()
    request = api.TransferRequest(
        from_account_id=source.id, to_account_id=target.id, amount="20.00", request_id=rid()
    )
    first = await account_stub.Transfer(request)
    second = await account_stub.Transfer(request)
    assert second == first
    assert await balance_of(sessions, source.id) == Decimal("30.00")
    assert await balance_of(sessions, target.id) == Decimal("20.00")
    assert [t.id for t in await transfer_rows(sessions)] == [first.id]


async def test_transfer_request_id_reused_with_other_amount(
    account_stub, factory: Factory, sessions
) -> None:
    source = await factory.account(balance="50.00")
    target = await factory.account()
    request_id = rid()
    await account_stub.Transfer(
        api.TransferRequest(
            from_account_id=source.id,
            to_account_id=target.id,
            amount="20.00",
            request_id=request_id,
        )
    )
    failure = await rpc_fails(
        account_stub.Transfer(
            api.TransferRequest(
                from_account_id=source.id,
                to_account_id=target.id,
                amount="20.01",
                request_id=request_id,
            )
        )
    )
    assert_failure(failure, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await balance_of(sessions, source.id) == Decimal("30.00")
    assert len(await transfer_rows(sessions)) == 1


# --- ListTransfers -----------------------------------------------------------------------


async def test_list_transfers_in_and_out_newest_first(account_stub, factory: Factory) -> None:
    mine, other, third = (
        await factory.account(),
        await factory.account(),
        await factory.account(),
    )
    out1 = await factory.transfer(mine, other, "1.00")
    await factory.transfer(other, third, "9.00")  # not mine
    in1 = await factory.transfer(other, mine, "2.50")
    out2 = await factory.transfer(mine, third, "0.01")

    page = await account_stub.ListTransfers(api.ListTransfersRequest(account_id=mine.id))
    assert [t.id for t in page.transfers] == [out2.id, in1.id, out1.id]
    assert [t.amount for t in page.transfers] == ["0.01", "2.50", "1.00"]
    assert page.transfers[1].from_account_id == other.id
    assert page.transfers[1].to_account_id == mine.id
    assert page.transfers[1].request_id == in1.request_id
    assert page.next_page_token == ""


async def test_list_transfers_empty(account_stub, factory: Factory) -> None:
    account = await factory.account()
    page = await account_stub.ListTransfers(api.ListTransfersRequest(account_id=account.id))
    assert list(page.transfers) == []
    assert page.next_page_token == ""


async def test_list_transfers_pages(account_stub, factory: Factory) -> None:
    mine, other = await factory.account(), await factory.account()
    made = []
    for n in range(7):
        made.append(
            await factory.transfer(mine, other, "1.00")
            if n % 2
            else await factory.transfer(other, mine, "1.00")
        )
    expected = sorted((t.id for t in made), reverse=True)

    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await account_stub.ListTransfers(
            api.ListTransfersRequest(account_id=mine.id, page_size=3, page_token=token)
        )
        pages += 1
        assert len(page.transfers) <= 3
        seen.extend(t.id for t in page.transfers)
        token = page.next_page_token
        if not token:
            break
        assert pages < 10
    assert seen == expected
    assert pages == 3


async def test_list_transfers_exact_page_has_no_next_token(account_stub, factory: Factory) -> None:
    mine, other = await factory.account(), await factory.account()
    for _ in range(3):
        await factory.transfer(mine, other, "1.00")
    page = await account_stub.ListTransfers(
        api.ListTransfersRequest(account_id=mine.id, page_size=3)
    )
    assert len(page.transfers) == 3
    assert page.next_page_token == ""


async def test_list_transfers_tampered_token(account_stub, factory: Factory) -> None:
    mine, other = await factory.account(), await factory.account()
    for _ in range(3):
        await factory.transfer(mine, other, "1.00")
    page = await account_stub.ListTransfers(
        api.ListTransfersRequest(account_id=mine.id, page_size=1)
    )
    token = page.next_page_token
    assert token
    payload, signature = token.split(".")
    tampered = [
        "garbage",
        token + "x",
        f"{payload}.{signature[::-1]}",
        f"{payload[:-2]}AA.{signature}",
        ".",
    ]
    for bad in tampered:
        failure = await rpc_fails(
            account_stub.ListTransfers(
                api.ListTransfersRequest(account_id=mine.id, page_size=1, page_token=bad)
            )
        )
        assert_invalid(failure, "page_token")


async def test_list_transfers_token_of_another_account(account_stub, factory: Factory) -> None:
    first, second = await factory.account(), await factory.account()
    for _ in range(3):
        await factory.transfer(first, second, "1.00")
    page = await account_stub.ListTransfers(
        api.ListTransfersRequest(account_id=first.id, page_size=1)
    )
    assert page.next_page_token
    failure = await rpc_fails(
        account_stub.ListTransfers(
            api.ListTransfersRequest(
                account_id=second.id, page_size=1, page_token=page.next_page_token
            )
        )
    )
    assert_invalid(failure, "page_token")


async def test_list_transfers_unknown_account(account_stub) -> None:
    failure = await rpc_fails(
        account_stub.ListTransfers(api.ListTransfersRequest(account_id=MISSING_ID))
    )
    assert_failure(failure, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_list_transfers_rejects_bad_arguments(account_stub) -> None:
    failure = await rpc_fails(
        account_stub.ListTransfers(api.ListTransfersRequest(account_id=0, page_size=-1))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"account_id", "page_size"} <= set(failure.violations)


async def test_list_transfers_shows_transfers_made_over_rpc(account_stub, factory: Factory) -> None:
    source = await factory.account(balance="10.00")
    target = await factory.account()
    made = await account_stub.Transfer(
        api.TransferRequest(
            from_account_id=source.id, to_account_id=target.id, amount="4.00", request_id=rid()
        )
    )
    page = await account_stub.ListTransfers(api.ListTransfersRequest(account_id=target.id))
    assert list(page.transfers) == [made]
    # The source's statement also shows how its money came in: the opening deposit, a transfer
    # from the external account.
    page = await account_stub.ListTransfers(api.ListTransfersRequest(account_id=source.id))
    assert len(page.transfers) == 2
    assert page.transfers[0] == made
    deposit = page.transfers[1]
    assert (deposit.to_account_id, deposit.amount) == (source.id, "10.00")
    assert deposit.request_id.startswith(OPENING_PREFIX)
    assert deposit.from_account_id not in (source.id, target.id)


# --- StreamTransfers ---------------------------------------------------------------------


async def test_stream_transfers_in_batches(account_stub, factory: Factory) -> None:
    mine, other, third = (
        await factory.account(),
        await factory.account(),
        await factory.account(),
    )
    made = []
    for n in range(11):
        made.append(
            await factory.transfer(mine, other, "1.00")
            if n % 3
            else await factory.transfer(other, mine, "2.00")
        )
    await factory.transfer(other, third, "5.00")  # not mine

    batches = [
        list(batch.transfers)
        async for batch in account_stub.StreamTransfers(
            api.StreamTransfersRequest(account_id=mine.id, batch_size=4)
        )
    ]
    assert [len(b) for b in batches] == [4, 4, 3]
    ids = [t.id for batch in batches for t in batch]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(t.id for t in made)
    by_id = {t.id: t for batch in batches for t in batch}
    for row in made:
        sent = by_id[row.id]
        assert (sent.from_account_id, sent.to_account_id) == (
            row.from_account_id,
            row.to_account_id,
        )
        assert sent.amount == f"{row.amount:.2f}"
        assert sent.request_id == row.request_id


async def test_stream_transfers_default_batch_size_is_500(
    account_stub, factory: Factory, engine: AsyncEngine
) -> None:
    # More rows than the default, so a batch of exactly 500 shows the default (docs/design.md's
    # "0 means 500") rather than "everything in one batch".
    mine, other = await factory.account(), await factory.account()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO transfers (from_account_id, to_account_id, amount, request_id) "
                "SELECT :mine, :other, 1.00, 'bulk-' || n FROM generate_series(1, 501) AS n"
            ),
            {"mine": mine.id, "other": other.id},
        )
    batches = [
        batch
        async for batch in account_stub.StreamTransfers(
            api.StreamTransfersRequest(account_id=mine.id)
        )
    ]
    assert [len(b.transfers) for b in batches] == [500, 1]


async def test_stream_transfers_empty_account(account_stub, factory: Factory) -> None:
    account = await factory.account()
    batches = [
        batch
        async for batch in account_stub.StreamTransfers(
            api.StreamTransfersRequest(account_id=account.id, batch_size=2)
        )
    ]
    assert sum(len(b.transfers) for b in batches) == 0


async def test_stream_transfers_unknown_account(account_stub) -> None:
    failure = await stream_fails(
        account_stub.StreamTransfers(api.StreamTransfersRequest(account_id=MISSING_ID))
    )
    assert_failure(failure, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_stream_transfers_rejects_bad_arguments(account_stub) -> None:
    failure = await stream_fails(
        account_stub.StreamTransfers(api.StreamTransfersRequest(account_id=0, batch_size=-1))
    )
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"account_id", "batch_size"} <= set(failure.violations)
