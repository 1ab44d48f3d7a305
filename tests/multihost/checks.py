"""What must hold after a load ran through restarts and kills: the bank's invariants, every
acknowledged transfer applied once, every export whole."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Transfer
from tests.faults.traffic import assert_balances_match_transfers
from tests.ledger import assert_ledger_balances
from tests.multihost.conftest import START_BALANCE, Seed
from tests.multihost.load import MixedLoad


async def assert_bank_intact(load: MixedLoad, seed: Seed, db: AsyncEngine) -> None:
    """Each acknowledged transfer is in the journal once, under the id it was answered with;
    nothing is there that was not sent; balances, legs and totals agree."""
    async with db.connect() as conn:
        rows = (
            await conn.execute(
                select(Transfer.request_id, Transfer.id).where(
                    Transfer.request_id.startswith(load.prefix)
                )
            )
        ).all()
    applied = Counter(request_id for request_id, _ in rows)
    assert [r for r, n in applied.items() if n > 1] == [], "a transfer applied twice"
    journal = dict(rows)
    lost = {r: i for r, i in load.acknowledged.items() if journal.get(r) != i}
    assert lost == {}, "acknowledged transfers missing from the journal (or under another id)"
    assert set(journal) <= load.issued
    await assert_balances_match_transfers(db, seed.account_ids, Decimal(START_BALANCE), load.prefix)
    await assert_ledger_balances(seed.sessions)


def assert_exports_whole(load: MixedLoad, seed: Seed) -> None:
    """Each finished export sent every user exactly once, in id order, resumes included (the
    users table does not change during the test, so every snapshot holds all of them)."""
    assert load.exports, "no export finished"
    for ids in load.exports:
        assert len(ids) == len(set(ids)), "an export sent a user twice"
        assert ids == sorted(seed.user_ids)
