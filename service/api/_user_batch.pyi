"""The compiled encoder (_user_batch.c); optional: users_encode.py falls back to upb."""

from collections.abc import Sequence
from typing import Any

def encode_user_batch(rows: Sequence[Sequence[Any]], resume_token: str) -> bytes:
    """The serialized shop.v1.UserBatch of rows of USER_COLUMNS and the resume token."""
