"""StreamUsers' batches as they go on the wire: serialized by the compiled encoder
(_user_batch.c, built by setup.py where a C compiler is found), else built by users_convert for
upb to serialize.

Building the UserBatch field by field and serializing it was ~45% of the server's time per
streamed row; the compiled encoder writes the same bytes straight from the rows (numbers in the
commit that added it, and in tests/unit/test_user_batch_encoder.py the proof that the bytes are
upb's)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from shop.v1 import user_service_pb2 as api

from service.api.users_convert import user_rows_to_batch


def _compiled() -> Callable[[Sequence[Any], str], bytes] | None:
    try:
        from service.api._user_batch import encode_user_batch
    except ImportError:  # not built here: no C compiler, or another platform
        return None
    return encode_user_batch


_encode = _compiled()
COMPILED = _encode is not None


class EncodedBatch:
    """A UserBatch already serialized, the users it carries (for the rows-sent metric) and its
    resume token (for the status of a stream whose reader stalled)."""

    __slots__ = ("data", "resume_token", "rows")

    def __init__(self, data: bytes, rows: int, resume_token: str) -> None:
        self.data = data
        self.rows = rows
        self.resume_token = resume_token


def encode_user_batch(rows: Sequence[Any], resume_token: str) -> api.UserBatch:
    """Rows of repositories.users.USER_COLUMNS -> what StreamUsers yields for them.

    With the compiled encoder that is an EncodedBatch, which only StreamUsers' response
    serializer (serialize_user_batch) and the interceptors' message hooks ever see; it is typed
    as the UserBatch it is on the wire, the type the servicer's contract (generated stubs)
    declares."""
    if _encode is None:
        return user_rows_to_batch(rows, resume_token)
    batch = EncodedBatch(_encode(rows, resume_token), len(rows), resume_token)
    return cast(api.UserBatch, batch)


def serialize_user_batch(batch: api.UserBatch | EncodedBatch) -> bytes:
    """StreamUsers' response serializer: encoded batches as they are, messages by upb."""
    if isinstance(batch, EncodedBatch):
        return batch.data
    return batch.SerializeToString()
