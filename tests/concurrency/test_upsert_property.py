"""UpsertUsers against an in-memory model, over the real channel.

1. Property test: random sequences of upserts (over a small, overlapping email pool with
   random letter case), soft deletes and invalid duplicate batches; after every step the
   reply and the whole users table must match the model exactly.
2. Concurrency: overlapping batches sent at once must all succeed (no deadlock) and the
   outcome must equal applying the batches one after another in some order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from dataclasses import dataclass

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shop.v1 import user_service_pb2 as api
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db.models import Base
from tests.rpc import failure_of

BOUND_SECONDS = 30
POOL = [f"user{i}@example.com" for i in range(8)]


@dataclass(frozen=True)
class Row:
    first_name: str
    last_name: str
    is_active: bool
    deleted: bool = False


Model = dict[str, Row]


async def truncate(engine: AsyncEngine) -> None:
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


async def table(engine: AsyncEngine) -> Model:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT email, first_name, last_name, is_active, deleted_at IS NOT NULL AS deleted "
                "FROM users"
            )
        )
        result: Model = {}
        for r in rows:
            assert r.email not in result, f"{r.email} stored twice"
            result[r.email] = Row(r.first_name, r.last_name, r.is_active, r.deleted)
        return result


async def user_id(engine: AsyncEngine, email: str) -> int:
    async with engine.connect() as conn:
        return (
            await conn.execute(text("SELECT id FROM users WHERE email = :e"), {"e": email})
        ).scalar_one()


# Printable: no control or format characters, line or paragraph separators (the server rejects
# them), no surrogates (not UTF-8), nothing unassigned (a later Unicode's format characters).
_core = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cf", "Zl", "Zp", "Cs", "Cn")),
    min_size=1,
    max_size=100,
).filter(lambda s: bool(s.strip()))
# Surrounding whitespace is stripped by the server before it checks the name.
_pad = st.sampled_from(["", "", " ", "  ", "\t", "\n ", "\u00a0"])
names = st.builds(lambda before, core, after: before + core + after, _pad, _core, _pad)


@st.composite
def emails(draw: st.DrawFn, base: str) -> str:
    """The pool email in a random letter case (the server lowercases)."""
    return "".join(c.upper() if c.isalpha() and draw(st.booleans()) else c for c in base)


@st.composite
def upsert_users(draw: st.DrawFn) -> list[api.UpsertUser]:
    chosen = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=len(POOL), unique=True))
    users = []
    for base in chosen:
        user = api.UpsertUser(
            email=draw(emails(base)), first_name=draw(names), last_name=draw(names)
        )
        active = draw(st.none() | st.booleans())
        if active is not None:
            user.is_active = active
        users.append(user)
    return users


def predict(model: Model, users: list[api.UpsertUser]) -> tuple[int, int]:
    """Apply a valid batch to the model; the (inserted, updated) the server must report."""
    inserted = updated = 0
    for u in users:
        email = u.email.lower()
        if email in model:
            updated += 1
        else:
            inserted += 1
        model[email] = Row(
            u.first_name.strip(),
            u.last_name.strip(),
            u.is_active if u.HasField("is_active") else True,
        )
    return inserted, updated


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_upsert_matches_model(user_stub, engine: AsyncEngine, data: st.DataObject) -> None:
    await truncate(engine)  # the database outlives a single hypothesis example
    model: Model = {}
    steps = data.draw(st.integers(min_value=1, max_value=8), label="steps")
    for _ in range(steps):
        live = sorted(e for e, r in model.items() if not r.deleted)
        kind = data.draw(
            st.sampled_from(["upsert"] * 6 + ["duplicate"] + (["delete"] if live else []))
        )
        if kind == "delete":
            email = data.draw(st.sampled_from(live))
            await user_stub.DeleteUser(api.DeleteUserRequest(id=await user_id(engine, email)))
            model[email] = dataclasses.replace(model[email], deleted=True)
        elif kind == "duplicate":
            users = data.draw(upsert_users())
            twin = api.UpsertUser()
            twin.CopyFrom(users[0])
            twin.email = twin.email.swapcase()  # same email once lowercased
            users.insert(data.draw(st.integers(0, len(users))), twin)
            try:
                await user_stub.UpsertUsers(api.UpsertUsersRequest(users=users))
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, failure
                assert any("more than once" in d for d in failure.violations.values()), failure
            else:
                raise AssertionError("a batch with a duplicate email was accepted")
        else:
            users = data.draw(upsert_users())
            request = api.UpsertUsersRequest(users=users)
            deleted = {e for e, r in model.items() if r.deleted}
            refused = sorted({u.email.lower() for u in users} & deleted)
            if refused:
                try:
                    await user_stub.UpsertUsers(request)
                except grpc.aio.AioRpcError as error:
                    failure = failure_of(error)
                    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION, failure
                    assert failure.reason == "USER_DELETED", failure
                    assert failure.metadata.get("emails") == ",".join(refused), failure
                else:
                    raise AssertionError(f"upsert of deleted users {refused} was accepted")
            else:
                reply = await user_stub.UpsertUsers(request)
                expected = predict(model, users)
                assert (reply.inserted, reply.updated) == expected
        assert await table(engine) == model


def serial_outcome(
    start: Model, batches: list[list[api.UpsertUser]], order: tuple[int, ...]
) -> tuple[Model, list[tuple[int, int]]]:
    """The table and per-call (inserted, updated) had the calls run one by one in `order`."""
    model = dict(start)
    counts: dict[int, tuple[int, int]] = {}
    for i in order:
        counts[i] = predict(model, batches[i])
    return model, [counts[i] for i in range(len(batches))]


async def test_concurrent_overlapping_upserts(user_stub, engine: AsyncEngine) -> None:
    rng = random.Random(20240611)
    pool = [f"conc{i:03d}@example.com" for i in range(60)]
    for round_no in range(5):
        await truncate(engine)
        if round_no % 2:  # some rows exist before the race: updates race as well
            seed = [api.UpsertUser(email=e, first_name="seed", last_name="seed") for e in pool[::3]]
            await user_stub.UpsertUsers(api.UpsertUsersRequest(users=seed))
        before = set((await table(engine)).keys())
        batches: list[list[api.UpsertUser]] = []
        for call in range(6):
            chosen = rng.sample(pool, rng.randint(35, 55))  # random order, heavy overlap
            batch = []
            for email in chosen:
                user = api.UpsertUser(
                    email=email.upper() if rng.random() < 0.3 else email,
                    first_name=f"r{round_no}c{call}",
                    last_name=f"{email}-{call}",
                )
                if rng.random() < 0.5:
                    user.is_active = rng.random() < 0.5
                batch.append(user)
            batches.append(batch)

        async def send(batch: list[api.UpsertUser]) -> tuple[str, object]:
            try:
                return "ok", await user_stub.UpsertUsers(api.UpsertUsersRequest(users=batch))
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                return failure.code.name, (failure.reason, failure.message)

        results = await asyncio.wait_for(asyncio.gather(*(send(b) for b in batches)), BOUND_SECONDS)
        failed = [r for r in results if r[0] != "ok"]
        assert not failed, failed
        replies = [reply for _, reply in results]

        distinct = {u.email.lower() for b in batches for u in b}
        assert sum(r.inserted for r in replies) == len(distinct - before)
        for reply, batch in zip(replies, batches, strict=True):
            assert reply.inserted + reply.updated == len(batch)

        final = await table(engine)
        assert set(final) == distinct | before
        for email in distinct:
            writers = [
                Row(u.first_name, u.last_name, u.is_active if u.HasField("is_active") else True)
                for b in batches
                for u in b
                if u.email.lower() == email
            ]
            assert final[email] in writers, email

        # Stronger: the race is equivalent to some serial order of the six calls (each
        # statement locks its rows in email order, so commits serialize per row).
        start: Model = {e: Row("seed", "seed", True) for e in before}
        counts = [(r.inserted, r.updated) for r in replies]
        explained = any(
            serial_outcome(start, batches, order) == (final, counts)
            for order in itertools.permutations(range(len(batches)))
        )
        assert explained, f"no serial order explains round {round_no}: {counts}"
