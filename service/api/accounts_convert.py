"""Account / Transfer models and rows <-> shop.v1 messages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from shop.v1 import account_service_pb2 as api
from shop.v1 import resources_pb2 as pb

from service.amounts import format_money
from service.api.convert import set_timestamp, timestamp
from service.app.money_rules import Kind, Posted, Posting


def account_to_proto(
    account: Any, *, balance: Decimal | None = None, updated_at: datetime | None = None
) -> pb.Account:
    """An Account entity or a Core row of repositories.accounts.ACCOUNT_COLUMNS (GetAccount's
    path) -> message, the same bytes for both. A deposit's or withdrawal's account comes as it
    stood right after it: its balance_after, and the batch transaction's timestamp (the
    posting's created_at) as updated_at."""
    return pb.Account(
        id=account.id,
        user_id=account.user_id or 0,  # only customer accounts (which have a user) get here
        currency=account.currency,
        balance=format_money(account.balance if balance is None else balance),
        created_at=timestamp(account.created_at),
        updated_at=timestamp(account.updated_at if updated_at is None else updated_at),
    )


def transfer_to_proto(transfer: Any) -> pb.Transfer:
    """A Transfer entity, a Core row with the same column names, or a batch's Posted."""
    return pb.Transfer(
        id=transfer.id,
        from_account_id=transfer.from_account_id,
        to_account_id=transfer.to_account_id,
        amount=format_money(transfer.amount),
        request_id=transfer.request_id,
        created_at=timestamp(transfer.created_at),
    )


def transfer_rows_to_batch(rows: Sequence[Any], resume_token: str = "") -> api.TransferBatch:
    """Rows of repositories.ledger.STATEMENT_COLUMNS, in that order -> one TransferBatch (the
    streaming hot path), filled in place like users_convert.user_rows_to_batch. The bytes are
    the same as transfer_to_proto's."""
    batch = api.TransferBatch(resume_token=resume_token)
    add = batch.transfers.add
    for transfer_id, from_account_id, to_account_id, amount, request_id, created in rows:
        transfer = add()
        transfer.id = transfer_id
        transfer.from_account_id = from_account_id
        transfer.to_account_id = to_account_id
        transfer.amount = format_money(amount)
        transfer.request_id = request_id
        set_timestamp(transfer.created_at, created)
    return batch


class ProtoAnswers:
    """What the money writer answers a posting with: a Transfer for a transfer, the account as
    it stood after it for a deposit or a withdrawal."""

    def answer(self, posting: Posting, posted: Posted) -> pb.Transfer | pb.Account:
        if posting.kind is Kind.TRANSFER:
            return transfer_to_proto(posted)
        return account_to_proto(
            posted.account, balance=posted.balance_after, updated_at=posted.created_at
        )

    def parse(self, kind: Kind, data: bytes) -> pb.Transfer | pb.Account:
        if kind is Kind.TRANSFER:
            return pb.Transfer.FromString(data)
        return pb.Account.FromString(data)


ANSWERS = ProtoAnswers()
