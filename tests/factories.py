"""Test data written straight to the database through the models (a real PostgreSQL)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

from shop.v1 import account_service_pb2 as api
from shop.v1 import resources_pb2 as pb
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.api.accounts_convert import ANSWERS
from service.app.money_rules import Kind, Posting
from service.app.money_writer import MoneyWriter
from service.db.database import Database
from service.db.engine import engine_of
from service.db.models import (
    ORDER_CURRENCY,
    Account,
    Order,
    OrderItem,
    OrderStatus,
    Transfer,
    User,
)

# request_id of the deposit that gives a factory account its opening balance.
OPENING_PREFIX = "factory-opening-"

_sequence = itertools.count(1)


class Factory:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        # Opening balances go through the service's own money writer, as a deposit would.
        self.money = MoneyWriter(Database(engine_of(sessions), sessions), ANSWERS)

    async def user(
        self,
        *,
        email: str | None = None,
        first_name: str = "Ada",
        last_name: str | None = None,
        is_active: bool = True,
        deleted: bool = False,
    ) -> User:
        n = next(_sequence)
        user = User(
            email=email or f"user{n}@example.com",
            first_name=first_name,
            last_name=last_name or f"Lovelace{n}",
            is_active=is_active,
            deleted_at=datetime.now(UTC) if deleted else None,
        )
        async with self.sessions() as session, session.begin():
            session.add(user)
        return user

    async def order(
        self,
        user: User,
        *,
        status: OrderStatus = OrderStatus.PENDING,
        items: list[tuple[str, int, str]] | None = None,
    ) -> Order:
        lines = [
            OrderItem(sku=sku, quantity=qty, unit_price=Decimal(price))
            for sku, qty, price in (items or [("SKU-1", 2, "9.99")])
        ]
        order = Order(
            user_id=user.id,
            status=status.value,
            total=sum((i.unit_price * i.quantity for i in lines), Decimal("0.00")),
            items=lines,
            currency=ORDER_CURRENCY,
        )
        async with self.sessions() as session, session.begin():
            session.add(order)
        return order

    async def account(
        self, user: User | None = None, *, currency: str = "EUR", balance: str = "0.00"
    ) -> Account:
        """An account whose opening balance, if any, is a deposit posted through the ledger
        (a transfer from the external account), so balance = its transfers in - out holds from the
        start."""
        owner = user or await self.user()
        account = Account(user_id=owner.id, currency=currency, balance=Decimal("0.00"))
        async with self.sessions() as session, session.begin():
            session.add(account)
        if Decimal(balance):
            request = api.DepositRequest(
                account_id=account.id,
                amount=balance,
                request_id=f"{OPENING_PREFIX}{next(_sequence)}",
            )
            posting = Posting(Kind.DEPOSIT, request.request_id, account.id, Decimal(balance))
            opened = await self.money.post("Deposit", request, posting)
            assert isinstance(opened, pb.Account)
            account.balance = Decimal(opened.balance)
        return account

    async def transfer(self, source: Account, target: Account, amount: str) -> Transfer:
        """A bare journal row for statement tests: balances untouched."""
        transfer = Transfer(
            from_account_id=source.id,
            to_account_id=target.id,
            amount=Decimal(amount),
            request_id=f"factory-{next(_sequence)}",
        )
        async with self.sessions() as session, session.begin():
            session.add(transfer)
        return transfer
