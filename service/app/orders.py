"""Orders: the unit of work and the rules of OrderService, for any transport. Answers are ORM
rows, or the export's partitions of row tuples."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from service.app.idempotency import IdempotentRequest, M, idempotent
from service.db.database import Database
from service.db.models import Order, OrderStatus
from service.repositories.orders import ItemFields as ItemFields  # what the callers fill in
from service.repositories.orders import OrderPartition as OrderPartition  # what export yields
from service.repositories.orders import OrderRepository
from service.repositories.users import UserRepository


class Orders:
    """Orders and their status life cycle."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self,
        user_id: int,
        items: Sequence[ItemFields],
        *,
        request: IdempotentRequest,
        answer: Callable[[Order], M],
        parse: Callable[[bytes], M],
    ) -> M:
        """A PENDING order for a live user, once per request.request_id: `answer` is what
        the first call returns and what a repeat gets back (stored in the same transaction)."""

        async def create(session: AsyncSession) -> M:
            await UserRepository(session).get_live(user_id)
            return answer(await OrderRepository(session).add(user_id, items))

        return await idempotent(
            self.db, method="CreateOrder", request=request, parse=parse, work=create
        )

    async def get(self, order_id: int) -> Order:
        """The order with its user and items loaded."""
        async with self.db.read() as session:
            return await OrderRepository(session).get(order_id)

    async def page(
        self, *, before_id: int, limit: int, user_id: int, status: OrderStatus | None
    ) -> Sequence[Order]:
        """Up to `limit` orders before `before_id`, newest first."""
        async with self.db.read() as session:
            return await OrderRepository(session).page(
                before_id=before_id, limit=limit, user_id=user_id, status=status
            )

    async def export(
        self, *, user_id: int, status: OrderStatus | None, batch_size: int, after_id: int
    ) -> AsyncGenerator[OrderPartition, None]:
        """Every matching order with its items after `after_id`, from one snapshot. Close it
        (aclosing) when the caller stops early: the snapshot ends then."""
        async with self.db.snapshot() as session:
            partitions = OrderRepository(session).export(
                user_id=user_id, status=status, batch_size=batch_size, after_id=after_id
            )
            async for partition in partitions:
                yield partition

    async def move(self, order_id: int, target: OrderStatus) -> Order:
        """Move the order along its life cycle; INVALID_STATUS_TRANSITION otherwise."""

        async def move(session: AsyncSession) -> Order:
            return await OrderRepository(session).move(order_id, target)

        return await self.db.write(move)
