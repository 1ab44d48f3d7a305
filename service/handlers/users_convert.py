"""User model / Core row <-> shop.v1 User."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shop.v1 import resources_pb2 as pb

from service.db.models import User
from service.handlers.convert import timestamp
from service.handlers.orders_convert import order_to_proto


def user_to_proto(user: User, *, with_orders: bool = False) -> pb.User:
    message = pb.User(
        id=user.id,
        email=user.email,
        first_name=user.first_name,
        last_name=user.last_name,
        full_name=user.full_name,
        is_active=user.is_active,
        created_at=timestamp(user.created_at),
        updated_at=timestamp(user.updated_at),
        deleted_at=timestamp(user.deleted_at),
    )
    if with_orders:
        message.orders.extend(order_to_proto(o) for o in user.orders)
    return message


def user_rows_to_batch(rows: Sequence[Any]) -> list[pb.User]:
    """Core rows of repositories.users.USER_COLUMNS -> messages (the streaming hot path)."""
    return [
        pb.User(
            id=r.id,
            email=r.email,
            first_name=r.first_name,
            last_name=r.last_name,
            full_name=f"{r.first_name} {r.last_name}",
            is_active=r.is_active,
            created_at=timestamp(r.created_at),
            updated_at=timestamp(r.updated_at),
            deleted_at=timestamp(r.deleted_at),
        )
        for r in rows
    ]
