"""ORM models. Relationships are lazy="raise": every query says what it loads."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    UniqueConstraint,
    event,
    func,
    inspect,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Unmapped,
    mapped_column,
    object_session,
    relationship,
    unmapped_column,
)
from sqlalchemy.sql.elements import ColumnElement

# Postgres-friendly constraint names, so migrations can name what they drop.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Money = Numeric(18, 2)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), Decimal: Money}
    # Server defaults (ids, created_at) come back in the INSERT's RETURNING: no refresh query.
    __mapper_args__ = {"eager_defaults": True}


def utcnow() -> datetime:
    return datetime.now(UTC)


class TimestampMixin:
    """created_at set by the database; updated_at refreshed by a before_update listener."""

    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())


@event.listens_for(TimestampMixin, "before_update", propagate=True)
def _touch_updated_at(_mapper: Any, _connection: Any, target: TimestampMixin) -> None:
    # before_update also fires for objects with no net column change (a value set to itself):
    # touching updated_at then would turn a no-op into an UPDATE and an audit row.
    session = object_session(target)
    if session is not None and not session.is_modified(target, include_collections=False):
        return
    # A Python value, not func.now(): the attribute stays loaded, so no refresh round trip.
    target.updated_at = utcnow()


class SoftDeleteMixin:
    """Rows are hidden by setting deleted_at, never removed."""

    deleted_at: Mapped[datetime | None] = mapped_column(default=None)

    @hybrid_property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None

    @is_deleted.inplace.expression
    @classmethod
    def _is_deleted_expression(cls) -> ColumnElement[bool]:
        return cls.deleted_at.is_not(None)


class User(TimestampMixin, SoftDeleteMixin, Base):
    __tablename__ = "users"
    __audited__ = True

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100))
    is_active: Mapped[bool] = mapped_column(server_default=true(), default=True)
    # Written by the database (alembic 0007): 1 on insert, +1 by a trigger on every update;
    # the change feed reads it from the change log. In the table, not in the mapping: the ORM
    # never selects, returns or sets it (so a build also serves a schema from before 0007).
    version: Unmapped[int] = unmapped_column(BigInteger, server_default="1")

    orders: Mapped[list[Order]] = relationship(
        back_populates="user", lazy="raise", order_by="Order.id"
    )

    @hybrid_property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}"

    @full_name.inplace.expression
    @classmethod
    def _full_name_expression(cls) -> ColumnElement[str]:
        return cls.first_name + " " + cls.last_name


# Orders are priced in the shop's one currency for now; the column lets that change.
ORDER_CURRENCY = "EUR"


class OrderStatus(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"

    def can_move_to(self, target: OrderStatus) -> bool:
        return target in _ORDER_MOVES[self]


_ORDER_MOVES: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset({OrderStatus.PAID, OrderStatus.CANCELLED}),
    OrderStatus.PAID: frozenset({OrderStatus.SHIPPED, OrderStatus.CANCELLED}),
    OrderStatus.SHIPPED: frozenset({OrderStatus.DELIVERED}),
    OrderStatus.DELIVERED: frozenset(),
    OrderStatus.CANCELLED: frozenset(),
}


class Order(TimestampMixin, Base):
    __tablename__ = "orders"
    __audited__ = True
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'paid', 'shipped', 'delivered', 'cancelled')", name="status"
        ),
        CheckConstraint("total >= 0", name="total_not_negative"),
        Index("ix_orders_user_id_id", "user_id", "id"),
        # ListOrders/StreamOrders filtered by status, in id order (built CONCURRENTLY: 0006).
        Index("ix_orders_status_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(String(16), default=OrderStatus.PENDING.value)
    # Written by the database (alembic 0007): 1 on insert, +1 by a trigger on every update;
    # the change feed reads it from the change log. In the table, not in the mapping: the ORM
    # never selects, returns or sets it (so a build also serves a schema from before 0007).
    version: Unmapped[int] = unmapped_column(BigInteger, server_default="1")
    total: Mapped[Decimal]
    # Rolled out expand-contract (alembic/versions/0003..0005, docs/migrations.md). A server
    # started on a schema without the column (SchemaFeatures) must never name it, so: deferred
    # and raising (a query loads it only when it asks, with undefer); evaluates_none (left
    # unset, it is left out of the INSERT instead of being sent as NULL); no default (for the
    # same reason; OrderRepository.add writes it).
    currency: Mapped[str] = mapped_column(
        String(3).evaluates_none(), deferred=True, deferred_raiseload=True
    )

    user: Mapped[User] = relationship(back_populates="orders", lazy="raise")
    items: Mapped[list[OrderItem]] = relationship(
        back_populates="order", lazy="raise", cascade="all, delete-orphan", order_by="OrderItem.id"
    )

    def loaded_currency(self) -> str:
        """The currency, or "" where the query left it out (a schema without the column yet:
        repositories.orders.order_column_options); reading it then would raise."""
        return "" if "currency" in inspect(self).unloaded else self.currency


class OrderItem(Base):
    __tablename__ = "order_items"
    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        CheckConstraint("unit_price >= 0", name="unit_price_not_negative"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("orders.id", ondelete="CASCADE"), index=True
    )
    sku: Mapped[str] = mapped_column(String(64))
    quantity: Mapped[int]
    unit_price: Mapped[Decimal]

    order: Mapped[Order] = relationship(back_populates="items", lazy="raise")


class AccountKind(StrEnum):
    """A customer's account, or the one external account per currency that stands for the
    world outside the ledger: deposits are transfers from it, withdrawals transfers to it.
    An external account caches no balance (it stays 0; its real balance is its transfers in
    minus out): updating one row per currency on every deposit would make all deposits wait on
    each other, and minus all the money in a currency may not fit NUMERIC(18, 2)."""

    CUSTOMER = "customer"
    EXTERNAL = "external"


# One external account per currency: the partial unique index's predicate.
EXTERNAL_INDEX_WHERE = "kind = 'external'"


class Account(TimestampMixin, Base):
    __tablename__ = "accounts"
    __audited__ = True
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_not_negative"),
        CheckConstraint("kind = 'customer' OR balance = 0", name="external_balance_not_cached"),
        CheckConstraint("currency ~ '^[A-Z]{3}$'", name="currency_iso4217"),
        CheckConstraint("kind IN ('customer', 'external')", name="kind"),
        CheckConstraint("(kind = 'customer') = (user_id IS NOT NULL)", name="owner_matches_kind"),
        Index(
            "uq_accounts_external_currency",
            "currency",
            unique=True,
            postgresql_where=text(EXTERNAL_INDEX_WHERE),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(
        String(8), default=AccountKind.CUSTOMER.value, server_default=AccountKind.CUSTOMER.value
    )
    currency: Mapped[str] = mapped_column(String(3))
    balance: Mapped[Decimal] = mapped_column(default=Decimal("0.00"), server_default="0")
    # Written by the database (alembic 0007): 1 on insert, +1 by a trigger on every update;
    # the change feed reads it from the change log. In the table, not in the mapping: the ORM
    # never selects, returns or sets it (so a build also serves a schema from before 0007).
    version: Unmapped[int] = unmapped_column(BigInteger, server_default="1")


class Transfer(Base):
    """Immutable record of money moved between two accounts (the ledger's journal: deposits and
    withdrawals are transfers from and to an external account). A trigger refuses UPDATE and
    DELETE (migration 0002)."""

    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("from_account_id <> to_account_id", name="distinct_accounts"),
        Index("ix_transfers_from_account_id_id", "from_account_id", "id"),
        Index("ix_transfers_to_account_id_id", "to_account_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    from_account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    to_account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    amount: Mapped[Decimal]
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class LedgerEntry(Base):
    """One leg of a transfer, as builds before issue 22 wrote them (a debit and a credit per
    transfer). No longer written nor read: the legs are the transfer row's from/to/amount. The
    table stays, mapped so `alembic check` agrees, until a later contract migration drops it
    once no running build writes it (docs/migrations.md). A trigger refuses UPDATE and DELETE
    (migration 0002)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("amount <> 0", name="amount_not_zero"),
        # One leg per account and transfer; also the index for finding a transfer's legs.
        UniqueConstraint("transfer_id", "account_id"),
        Index("ix_ledger_entries_account_id_id", "account_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    transfer_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("transfers.id"))
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    amount: Mapped[Decimal]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class IdempotencyKey(Base):
    """A client's request_id, the hash of what it asked and the response it got."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        # For the purge alone. BRIN, not a B-tree: keys are appended in created_at order, and
        # an insert on the unsummarized tail costs it nothing (alembic 0008, issue 22).
        Index("brin_idempotency_keys_created_at", "created_at", postgresql_using="brin"),
    )

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary)
    response: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class AuditLog(Base):
    """One row per ORM insert, update or soft delete of an audited model (see audit.py)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    table_name: Mapped[str] = mapped_column(String(64))
    row_id: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(16))
    changes: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Change(Base):
    """One statement's changes to one resource table, written by the triggers of alembic 0007
    in the writing transaction: `rows` is a JSON array of [operation, row as after it]. The
    change feed (app/changes.py) reads them; nothing in the service writes them."""

    __tablename__ = "changes"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    xid: Mapped[int] = mapped_column(BigInteger, index=True)  # the writer's pg_current_xact_id()
    resource_type: Mapped[int] = mapped_column(SmallInteger)
    changed_at: Mapped[datetime] = mapped_column(server_default=func.clock_timestamp())
    # How many changes `rows` holds (1..1000): what a reader can count without detoasting it.
    entries: Mapped[int] = mapped_column(SmallInteger)
    rows: Mapped[list[Any]] = mapped_column(JSONB)


class ChangesPruned(Base):
    """How far the change log has been pruned (housekeeping): every change of a transaction
    with xid <= through_xid is gone; a position that may miss one has expired. One row."""

    __tablename__ = "changes_pruned"
    __table_args__ = (CheckConstraint("one", name="one"),)

    one: Mapped[bool] = mapped_column(primary_key=True, server_default=true())
    through_xid: Mapped[int] = mapped_column(BigInteger, server_default="0")
