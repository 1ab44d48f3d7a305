"""User model / Core row <-> shop.v1 User."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shop.v1 import resources_pb2 as pb
from shop.v1 import user_service_pb2 as api

from service.api.convert import set_timestamp, timestamp
from service.api.orders_convert import order_to_proto
from service.db.models import User


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


def user_row_to_proto(row: Any) -> pb.User:
    """A row of repositories.users.USER_COLUMNS -> message (GetUser's path)."""
    user = pb.User()
    _fill(user, row)
    return user


def user_rows_to_batch(rows: Sequence[Any], resume_token: str = "") -> api.UserBatch:
    """Rows of repositories.users.USER_COLUMNS -> one UserBatch (the streaming hot path). Each
    user is added to the batch in place and set field by field, its timestamps from epoch
    microseconds: building pb.User objects with Timestamp.FromDatetime and copying them into
    the batch cost ~8x more per row. The bytes are the same as user_to_proto's."""
    batch = api.UserBatch(resume_token=resume_token)
    add = batch.users.add
    for row in rows:
        _fill(add(), row)
    return batch


def _fill(user: pb.User, row: Any) -> None:
    user_id, email, first_name, last_name, is_active, created, updated, deleted = row
    user.id = user_id
    user.email = email
    user.first_name = first_name
    user.last_name = last_name
    user.full_name = f"{first_name} {last_name}"
    user.is_active = is_active
    # convert.set_timestamp, inlined for the two timestamps every row has: on the export's hot
    # path the calls cost ~10% of the conversion (docs/benchmark-profiles.md).
    ts = user.created_at
    ts.seconds, micros = divmod(created, 1_000_000)
    ts.nanos = micros * 1000
    ts = user.updated_at
    ts.seconds, micros = divmod(updated, 1_000_000)
    ts.nanos = micros * 1000
    if deleted is not None:
        set_timestamp(user.deleted_at, deleted)
