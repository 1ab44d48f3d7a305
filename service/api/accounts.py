"""AccountService: convert the request, call the application (service/app/accounts.py),
convert; every write is idempotent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import cast

from google.protobuf.message import Message
from shop.v1 import account_service_pb2 as api
from shop.v1 import account_service_pb2_grpc as api_grpc
from shop.v1 import resources_pb2 as pb

from service.api.accounts_convert import (
    account_to_proto,
    transfer_rows_to_batch,
    transfer_to_proto,
)
from service.api.context import Context
from service.api.paging import PageTokens, last_id
from service.api.status import status_message
from service.api.validation import MAX_ID, Violations
from service.app.accounts import Accounts
from service.app.money_rules import Kind, Posting
from service.db.coalescer import Outcome
from service.errors import DomainError, InvalidArgument


class AccountServicer(api_grpc.AccountServiceServicer):
    """Money accounts, deposits, withdrawals and transfers."""

    def __init__(self, accounts: Accounts[pb.Transfer | pb.Account], tokens: PageTokens) -> None:
        self.accounts = accounts
        self.tokens = tokens

    async def OpenAccount(self, request: api.OpenAccountRequest, context: Context) -> pb.Account:
        """A zero-balance account for a live user."""
        v = Violations()
        v.id("user_id", request.user_id)
        currency = v.currency("currency", request.currency)
        v.request_id("request_id", request.request_id)
        v.raise_if_any()
        return await self.accounts.open(
            request.user_id,
            currency,
            request=request,
            answer=account_to_proto,
            parse=pb.Account.FromString,
        )

    async def GetAccount(self, request: api.GetAccountRequest, context: Context) -> pb.Account:
        """An account and its current balance."""
        v = Violations()
        v.id("id", request.id)
        v.raise_if_any()
        return account_to_proto(await self.accounts.row(request.id))

    async def Deposit(self, request: api.DepositRequest, context: Context) -> pb.Account:
        """Add money; returns the account as it stood right after this deposit."""
        posting = _single_account(Kind.DEPOSIT, request)
        return cast(pb.Account, await self.accounts.post("Deposit", request, posting))

    async def Withdraw(self, request: api.WithdrawRequest, context: Context) -> pb.Account:
        """Take money out; INSUFFICIENT_FUNDS rather than a negative balance."""
        posting = _single_account(Kind.WITHDRAW, request)
        return cast(pb.Account, await self.accounts.post("Withdraw", request, posting))

    async def Transfer(self, request: api.TransferRequest, context: Context) -> pb.Transfer:
        """Move money between two accounts of one currency, atomically."""
        v = Violations()
        posting = _transfer(v, "", request)
        v.raise_if_any()
        return cast(pb.Transfer, await self.accounts.post("Transfer", request, posting))

    async def BatchTransfer(
        self, request: api.BatchTransferRequest, context: Context
    ) -> api.BatchTransferResponse:
        """Up to 1000 transfers, each applied or refused on its own, each idempotent by its
        request_id (a repeat of a unary Transfer's request_id answers as Transfer would)."""
        if not request.requests or len(request.requests) > MAX_BATCH_TRANSFER:
            raise InvalidArgument.single(
                "requests", f"must hold 1 to {MAX_BATCH_TRANSFER} transfers"
            )
        # Both lists are bounded by MAX_BATCH_TRANSFER, checked by len() above; each refused
        # item's status holds its own violations (5 at most, _transfer's checks).
        results: list[api.TransferResult | None] = []
        valid: list[tuple[api.TransferRequest, Posting]] = []
        for index, item in enumerate(request.requests):
            v = Violations()
            posting = _transfer(v, f"requests[{index}].", item)
            error = v.error()
            if error is not None:
                results.append(api.TransferResult(error=status_message(error)))
            else:
                results.append(None)
                valid.append((item, posting))
        outcomes = iter(await self.accounts.post_many("Transfer", valid))
        response = api.BatchTransferResponse()
        for result in results:
            response.results.append(result if result is not None else _result(next(outcomes)))
        return response

    async def ListTransfers(
        self, request: api.ListTransfersRequest, context: Context
    ) -> api.ListTransfersResponse:
        """A page of the account's transfers, newest first."""
        v = Violations()
        v.id("account_id", request.account_id)
        limit = v.page_size("page_size", request.page_size)
        v.raise_if_any()
        filters = {"account_id": request.account_id}
        page, next_token = await self.tokens.page(
            request.page_token,
            filters,
            limit,
            fetch=lambda before_id, count: self.accounts.transfers_page(
                request.account_id, before_id=before_id, limit=count
            ),
            start=MAX_ID,
        )
        return api.ListTransfersResponse(
            transfers=[transfer_to_proto(t) for t in page], next_page_token=next_token
        )

    async def StreamTransfers(
        self, request: api.StreamTransfersRequest, context: Context
    ) -> AsyncIterator[api.TransferBatch]:
        """The account's whole statement, oldest first, batch_size per message, from one
        consistent snapshot; each batch carries a resume token that starts a new export after
        its last transfer."""
        v = Violations()
        v.id("account_id", request.account_id)
        batch_size = v.batch_size("batch_size", request.batch_size)
        v.raise_if_any()
        # "export" keeps ListTransfers page tokens and other exports' tokens from passing here.
        filters = {"export": "transfers", "account_id": request.account_id}
        messages = self.tokens.export(
            request.resume_token,
            filters,
            batches=lambda after_id: self.accounts.statement(
                request.account_id, batch_size=batch_size, after_id=after_id
            ),
            last_key=last_id,
            convert=transfer_rows_to_batch,
        )
        # Closed here, and with it the snapshot, even when the call ends at a yield.
        async with aclosing(messages):
            async for message in messages:
                yield message


MAX_BATCH_TRANSFER = 1000


def _transfer(v: Violations, prefix: str, request: api.TransferRequest) -> Posting:
    v.id(f"{prefix}from_account_id", request.from_account_id)
    v.id(f"{prefix}to_account_id", request.to_account_id)
    if request.from_account_id == request.to_account_id and request.from_account_id > 0:
        v.add(f"{prefix}to_account_id", "must differ from from_account_id")
    amount = v.amount(f"{prefix}amount", request.amount)
    v.request_id(f"{prefix}request_id", request.request_id)
    return Posting(
        Kind.TRANSFER,
        request.request_id,
        request.from_account_id,
        amount,
        request.to_account_id,
    )


def _single_account(kind: Kind, request: api.DepositRequest | api.WithdrawRequest) -> Posting:
    """A deposit's or withdrawal's posting, once the request is valid."""
    v = Violations()
    v.id("account_id", request.account_id)
    amount = v.amount("amount", request.amount)
    v.request_id("request_id", request.request_id)
    v.raise_if_any()
    return Posting(kind, request.request_id, request.account_id, amount)


def _result(outcome: Outcome[Message]) -> api.TransferResult:
    """A batch item's result; a failure that is not the item's own (the database went away,
    contention outlasted the retries) fails the whole call, which the client may repeat: every
    item is idempotent."""
    if isinstance(outcome, DomainError):
        return api.TransferResult(error=status_message(outcome))
    if isinstance(outcome, BaseException):
        raise outcome
    return api.TransferResult(transfer=cast(pb.Transfer, outcome))
