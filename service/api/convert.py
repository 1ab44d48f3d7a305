"""Proto <-> Python helpers shared by every aggregate's converters."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def set_timestamp(field: Timestamp, epoch_microseconds: int) -> None:
    """Set a message's Timestamp field in place from microseconds since the Unix epoch (as
    db.streaming.epoch_microseconds selects them): what FromDatetime gives for the same instant,
    by one divmod instead of its time tuple and timegm (~10x the cost), twice per streamed row."""
    seconds, microseconds = divmod(epoch_microseconds, 1_000_000)
    field.seconds = seconds
    field.nanos = microseconds * 1000


def seconds_and_nanos(value: datetime) -> tuple[int, int]:
    """An aware datetime as a Timestamp's (seconds, nanos): what FromDatetime sets, by one
    subtraction (~240 ns where FromDatetime takes ~1.8 us, and epoch microseconds for
    set_timestamp by floor division ~530 ns; protobuf 7 upb)."""
    since = value - _EPOCH
    return since.days * 86_400 + since.seconds, since.microseconds * 1000
