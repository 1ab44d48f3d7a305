"""AccountService: thin servicer over AccountRepository; every write is idempotent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import asyncpg  # type: ignore[import-untyped]
from shop.v1 import account_service_pb2 as api
from shop.v1 import account_service_pb2_grpc as api_grpc
from shop.v1 import resources_pb2 as pb
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Account
from service.db.transaction import read_only_snapshot
from service.db.unit_of_work import Database
from service.handlers.accounts_convert import (
    account_row_to_proto,
    account_to_proto,
    transfer_rows_to_batch,
    transfer_to_proto,
)
from service.handlers.context import Context
from service.handlers.idempotency import idempotent, idempotent_on_driver
from service.handlers.paging import PageTokens
from service.handlers.validation import MAX_ID, Violations
from service.repositories.accounts import AccountRepository
from service.repositories.ledger import Ledger
from service.repositories.transfers import Transfers
from service.repositories.users import UserRepository


class AccountServicer(api_grpc.AccountServiceServicer):
    """Money accounts, deposits, withdrawals and transfers."""

    def __init__(self, db: Database, tokens: PageTokens) -> None:
        self.db = db
        self.sessions = db.sessions
        self.engine = db.engine
        self.tokens = tokens
        # GetAccount: concurrent calls share one statement (WHERE id = ANY(:ids)) per batch.
        self._accounts_by_id = db.point_reads(AccountRepository.rows_by_id)

    async def OpenAccount(self, request: api.OpenAccountRequest, context: Context) -> pb.Account:
        """A zero-balance account for a live user."""
        v = Violations()
        v.id("user_id", request.user_id)
        currency = v.currency("currency", request.currency)
        v.request_id("request_id", request.request_id)
        v.raise_if_any()

        async def open_account(session: AsyncSession) -> pb.Account:
            await UserRepository(session).get_live(request.user_id)
            account = await AccountRepository(session).add(request.user_id, currency)
            return account_to_proto(account)

        return await idempotent(
            self.sessions,
            method="OpenAccount",
            request=request,
            response_type=pb.Account,
            work=open_account,
        )

    async def GetAccount(self, request: api.GetAccountRequest, context: Context) -> pb.Account:
        """An account and its current balance."""
        v = Violations()
        v.id("id", request.id)
        v.raise_if_any()
        return account_row_to_proto(await self._accounts_by_id.submit(request.id))

    async def Deposit(self, request: api.DepositRequest, context: Context) -> pb.Account:
        """Add money; returns the account as it stood right after this deposit."""
        return await self._post("Deposit", request, AccountRepository.deposit)

    async def Withdraw(self, request: api.WithdrawRequest, context: Context) -> pb.Account:
        """Take money out; INSUFFICIENT_FUNDS rather than a negative balance."""
        return await self._post("Withdraw", request, AccountRepository.withdraw)

    async def _post(
        self,
        method: str,
        request: api.DepositRequest | api.WithdrawRequest,
        apply: Callable[[AccountRepository, int, Decimal, str], Awaitable[Account]],
    ) -> pb.Account:
        """One idempotent balance change on one account."""
        v = Violations()
        v.id("account_id", request.account_id)
        amount = v.amount("amount", request.amount)
        v.request_id("request_id", request.request_id)
        v.raise_if_any()

        async def post(session: AsyncSession) -> pb.Account:
            repository = AccountRepository(session)
            account = await apply(repository, request.account_id, amount, request.request_id)
            return account_to_proto(account)

        return await idempotent(
            self.sessions,
            method=method,
            request=request,
            response_type=pb.Account,
            work=post,
        )

    async def Transfer(self, request: api.TransferRequest, context: Context) -> pb.Transfer:
        """Move money between two accounts of one currency, atomically."""
        v = Violations()
        v.id("from_account_id", request.from_account_id)
        v.id("to_account_id", request.to_account_id)
        if request.from_account_id == request.to_account_id and request.from_account_id > 0:
            v.add("to_account_id", "must differ from from_account_id")
        amount = v.amount("amount", request.amount)
        v.request_id("request_id", request.request_id)
        v.raise_if_any()

        async def transfer(driver: asyncpg.Connection) -> pb.Transfer:
            done = await Transfers(driver).transfer(
                request.from_account_id, request.to_account_id, amount, request.request_id
            )
            return transfer_to_proto(done)

        # The hottest write, so on the driver (service/db/driver.py): the same statements,
        # without the session's per-statement cost.
        return await idempotent_on_driver(
            self.engine,
            method="Transfer",
            request=request,
            response_type=pb.Transfer,
            work=transfer,
        )

    async def ListTransfers(
        self, request: api.ListTransfersRequest, context: Context
    ) -> api.ListTransfersResponse:
        """A page of the account's transfers, newest first."""
        v = Violations()
        v.id("account_id", request.account_id)
        limit = v.page_size("page_size", request.page_size)
        v.raise_if_any()
        filters = {"account_id": request.account_id}
        before_id = (
            self.tokens.decode(request.page_token, filters) if request.page_token else MAX_ID
        )
        async with self.sessions() as session:
            accounts = AccountRepository(session)
            await accounts.get(request.account_id)
            transfers = await accounts.transfers_page(
                request.account_id, before_id=before_id, limit=limit + 1
            )
        page = transfers[:limit]
        next_token = self.tokens.encode(page[-1].id, filters) if len(transfers) > limit else ""
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
        after_id = self.tokens.resume_after(request.resume_token, filters)
        resume_token = self.tokens.encoder(filters)
        async with read_only_snapshot(self.sessions) as session:
            await AccountRepository(session).get(request.account_id)
            batches = Ledger(session).statement(
                request.account_id, batch_size=batch_size, after_id=after_id
            )
            async for rows in batches:
                yield transfer_rows_to_batch(rows, resume_token(rows[-1].id))
