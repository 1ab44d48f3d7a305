"""Group commit for money: the Transfer, Deposit, Withdraw and BatchTransfer calls of this
process are applied together, one transaction per batch (repositories/ledger.py), each with
its own outcome and each idempotent by its request_id.

A batch is what queued while the previous one ran (db/coalescer.py), so one call in flight is a
batch of one and the batch grows with the load. The whole batch runs again on a serialization
failure or deadlock, and when a concurrent transaction claimed one of its request_ids first
(ConcurrentClaim: the run again answers that one from the key it committed). A caller that
goes away after its posting entered a batch does not take it out: the batch commits, and the
caller's retry with the same request_id gets the stored answer.

What a posting answers (a message, and its bytes for the idempotency key) is the caller's: the
gRPC room hands the writer its Answers, so this module knows no protobuf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from service.app.failures import as_domain_error
from service.app.idempotency import IdempotentRequest, Serializable, request_fingerprint
from service.app.money_rules import Kind, Posted, Posting, plan
from service.db.coalescer import Outcome
from service.db.database import Database
from service.db.deadlines import DeadlinePassed
from service.errors import AlreadyExists, DomainError
from service.repositories.idempotency import StoredRequest
from service.repositories.ledger import Answered, Claims, Ledger, Locked, Writes

# A batch's size bound: a BatchTransfer of 1000 is one transaction, and unary calls never come
# near it (the batch is at most what is in flight).
MAX_BATCH = 1000


A = TypeVar("A", bound=Serializable)
A_co = TypeVar("A_co", bound=Serializable, covariant=True)


class Answers(Protocol[A_co]):
    """What a posting answers, built inside its batch (its bytes are stored with the key), and
    a stored answer read back for a repeat."""

    def answer(self, posting: Posting, posted: Posted) -> A_co: ...

    def parse(self, kind: Kind, data: bytes) -> A_co: ...


def _item_outcome(outcome: Outcome[A]) -> Outcome[A]:
    if isinstance(outcome, DeadlinePassed):
        return as_domain_error(outcome) or outcome
    return outcome


@dataclass(frozen=True, slots=True)
class Asked:
    """A posting and the fingerprint of the request that asked for it (the idempotency rule
    compares it)."""

    posting: Posting
    fingerprint: bytes


class MoneyWriter(Generic[A]):
    """The one writer of balances."""

    def __init__(self, db: Database, answers: Answers[A]) -> None:
        self._answers = answers
        self._writer = db.batched(self._apply, name="money batch", max_batch=MAX_BATCH)

    async def post(self, method: str, request: IdempotentRequest, posting: Posting) -> A:
        return await self._writer.submit(_asked(method, request, posting))

    async def post_many(
        self, method: str, requests: Sequence[tuple[IdempotentRequest, Posting]]
    ) -> list[Outcome[A]]:
        outcomes = await self._writer.submit_many([_asked(method, r, p) for r, p in requests])
        # An item whose deadline passed before its batch began was not applied: that is the
        # item's own outcome, as a domain error. Any other failure stays the whole call's.
        return [_item_outcome(o) for o in outcomes]

    async def _apply(self, conn: AsyncConnection, batch: Sequence[Asked]) -> list[Outcome[A]]:
        ledger = Ledger(conn)
        # The first posting under a request_id owns it in this batch; a repeat is answered
        # like a repeat in a later batch (below).
        owners: dict[str, Asked] = {}
        for asked in batch:
            owners.setdefault(asked.posting.request_id, asked)
        # The accounts first, then the keys: a repeat of a posting still running elsewhere waits
        # here for that one's commit (they share accounts), then reads the key it committed.
        postings = [a.posting for a in owners.values()]
        accounts = await ledger.lock(
            [p.account_id for p in postings]
            + [p.to_account_id for p in postings if p.kind is Kind.TRANSFER]
        )
        claims = await ledger.claim(sorted(owners))

        todo = [a for rid, a in owners.items() if rid in claims.transfer_ids]
        answers: dict[str, Outcome[A]] = {}
        if todo:
            answers = await self._post(ledger, todo, claims, accounts)
        for rid, stored in claims.stored.items():
            answers[rid] = self._stored(owners[rid], stored)
        return [_for(asked, owners, answers) for asked in batch]

    async def _post(
        self, ledger: Ledger, todo: list[Asked], claims: Claims, accounts: dict[int, Locked]
    ) -> dict[str, Outcome[A]]:
        wanted = [a.posting for a in todo]
        currencies = {
            accounts[p.account_id].currency
            for p in wanted
            if p.kind is not Kind.TRANSFER and p.account_id in accounts
        }
        externals = await ledger.externals(currencies) if currencies else {}
        writes = Writes()
        outcomes = plan(wanted, claims, accounts, externals, writes)
        answers: dict[str, Outcome[A]] = {}
        # A posting refused (a DomainError) stores no key, so the same request may come again.
        applied: list[Answered] = []
        for asked, outcome in zip(todo, outcomes, strict=True):
            rid = asked.posting.request_id
            if isinstance(outcome, DomainError):
                answers[rid] = outcome
            else:
                message = self._answers.answer(asked.posting, outcome)
                answers[rid] = message
                applied.append(Answered(rid, asked.fingerprint, message.SerializeToString()))
        await ledger.apply(writes, applied)
        return answers

    def _stored(self, asked: Asked, stored: StoredRequest) -> Outcome[A]:
        """A request_id claimed before this batch: its stored response if the request is the
        same, else REQUEST_ID_REUSED."""
        rid = asked.posting.request_id
        if stored.request_hash != asked.fingerprint or stored.response is None:
            return AlreadyExists.request_id_reused(rid)
        return self._answers.parse(asked.posting.kind, stored.response)


def _asked(method: str, request: IdempotentRequest, posting: Posting) -> Asked:
    return Asked(posting, request_fingerprint(method, request))


def _for(asked: Asked, owners: dict[str, Asked], answers: dict[str, Outcome[A]]) -> Outcome[A]:
    rid = asked.posting.request_id
    owner = owners[rid]
    if owner is not asked and owner.fingerprint != asked.fingerprint:
        return AlreadyExists.request_id_reused(rid)
    return answers[rid]
