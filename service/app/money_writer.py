"""Group commit for money: the Transfer, Deposit, Withdraw and BatchTransfer calls of this
process are applied together, one transaction per batch (repositories/ledger.py), each with
its own outcome and each idempotent by its request_id.

A batch is what queued while the previous one ran (db/coalescer.py), so one call in flight is a
batch of one and the batch grows with the load. The whole batch runs again on a serialization
failure or deadlock. A caller that goes away after its posting entered a batch does not take it
out: the batch commits, and the caller's retry with the same request_id gets the stored answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import Message
from shop.v1 import resources_pb2 as pb
from sqlalchemy.ext.asyncio import AsyncConnection

from service.api.accounts_convert import posted_account_to_proto, transfer_to_proto
from service.app.idempotency import IdempotentRequest, request_fingerprint
from service.app.money_rules import Kind, Posted, Posting, plan
from service.db.coalescer import Outcome
from service.db.database import Database
from service.errors import AlreadyExists, DomainError, Unavailable
from service.repositories.idempotency import IdempotencyRepository, StoredRequest
from service.repositories.ledger import Claims, Ledger, Writes

# A batch's size bound: a BatchTransfer of 1000 is one transaction, and unary calls never come
# near it (the batch is at most what is in flight).
MAX_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Asked:
    """A posting and what answers it: the fingerprint of the request that asked for it (the
    idempotency rule compares it), and the message type of its answer."""

    posting: Posting
    fingerprint: bytes
    response_type: type[pb.Transfer] | type[pb.Account]


class MoneyWriter:
    """The one writer of balances."""

    def __init__(self, db: Database) -> None:
        self._writer = db.batched(self._apply, max_batch=MAX_BATCH)

    async def post(self, method: str, request: IdempotentRequest, posting: Posting) -> Message:
        return await self._writer.submit(_asked(method, request, posting))

    async def post_many(
        self, method: str, requests: Sequence[tuple[IdempotentRequest, Posting]]
    ) -> list[Outcome[Message]]:
        return await self._writer.submit_many([_asked(method, r, p) for r, p in requests])

    async def _apply(self, conn: AsyncConnection, batch: Sequence[Asked]) -> list[Outcome[Message]]:
        ledger = Ledger(conn)
        # The first posting under a request_id owns it in this batch; a repeat is answered
        # like a repeat in a later batch (below).
        owners: dict[str, Asked] = {}
        for asked in batch:
            owners.setdefault(asked.posting.request_id, asked)
        claims = await ledger.claim(sorted((rid, a.fingerprint) for rid, a in owners.items()))
        unclaimed = [rid for rid in owners if rid not in claims.transfer_ids]
        stored = await IdempotencyRepository(conn).stored(unclaimed) if unclaimed else {}

        todo = [a for rid, a in owners.items() if rid in claims.transfer_ids]
        answers: dict[str, Outcome[Message]] = {}
        if todo:
            answers = await self._post(ledger, todo, claims)
        for rid in unclaimed:
            answers[rid] = _answer(owners[rid], stored.get(rid))
        return [_for(asked, owners, answers) for asked in batch]

    async def _post(
        self, ledger: Ledger, todo: list[Asked], claims: Claims
    ) -> dict[str, Outcome[Message]]:
        wanted = [a.posting for a in todo]
        ids = [p.account_id for p in wanted] + [
            p.to_account_id for p in wanted if p.kind is Kind.TRANSFER
        ]
        accounts = await ledger.lock(ids)
        currencies = {
            accounts[p.account_id].currency
            for p in wanted
            if p.kind is not Kind.TRANSFER and p.account_id in accounts
        }
        externals = await ledger.externals(currencies) if currencies else {}
        writes = Writes()
        outcomes = plan(wanted, claims, accounts, externals, writes)
        answers: dict[str, Outcome[Message]] = {}
        responses: dict[str, bytes] = {}
        released: list[str] = []
        for asked, outcome in zip(todo, outcomes, strict=True):
            rid = asked.posting.request_id
            if isinstance(outcome, DomainError):
                answers[rid] = outcome
                released.append(rid)
            else:
                message = _response(asked.posting, outcome)
                answers[rid] = message
                responses[rid] = message.SerializeToString()
        await ledger.apply(writes, responses, released)
        return answers


def _asked(method: str, request: IdempotentRequest, posting: Posting) -> Asked:
    response_type = pb.Transfer if posting.kind is Kind.TRANSFER else pb.Account
    return Asked(posting, request_fingerprint(method, request), response_type)


def _response(posting: Posting, posted: Posted) -> Message:
    if posting.kind is Kind.TRANSFER:
        return transfer_to_proto(posted)
    return posted_account_to_proto(posted)


def _answer(asked: Asked, stored: StoredRequest | None) -> Outcome[Message]:
    """A request_id claimed before this batch: its stored response if the request is the same,
    else REQUEST_ID_REUSED."""
    rid = asked.posting.request_id
    if stored is None:
        # Purged between our claim and our read (keys live 24 h): nothing was applied here.
        return Unavailable("the request could not be settled; retry it", reason="RETRY")
    if stored.request_hash != asked.fingerprint or stored.response is None:
        return AlreadyExists.request_id_reused(rid)
    return asked.response_type.FromString(stored.response)


def _for(
    asked: Asked, owners: dict[str, Asked], answers: dict[str, Outcome[Message]]
) -> Outcome[Message]:
    rid = asked.posting.request_id
    owner = owners[rid]
    if owner is not asked and owner.fingerprint != asked.fingerprint:
        return AlreadyExists.request_id_reused(rid)
    return answers[rid]
