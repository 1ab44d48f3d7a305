"""StreamUsers resume tokens: each batch says where to continue; tokens are bound to filters."""

from __future__ import annotations

from shop.v1 import user_service_pb2 as api
from shop.v1 import user_service_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.rpc import stream_fails
from tests.streams.helpers import insert_users

Stub = user_service_pb2_grpc.UserServiceStub


async def ids_from(stub: Stub, **request: object) -> list[list[int]]:
    return [
        [u.id for u in b.users] async for b in stub.StreamUsers(api.StreamUsersRequest(**request))
    ]


async def test_resuming_from_any_batch_continues_after_its_last_user(
    user_stub: Stub, engine: AsyncEngine
) -> None:
    await insert_users(engine, 25)
    batches = [b async for b in user_stub.StreamUsers(api.StreamUsersRequest(batch_size=10))]
    assert [len(b.users) for b in batches] == [10, 10, 5]
    assert all(b.resume_token for b in batches)

    first_half = [u.id for u in batches[0].users]
    rest = await ids_from(user_stub, batch_size=10, resume_token=batches[0].resume_token)
    together = first_half + [i for batch in rest for i in batch]
    assert together == list(range(1, 26))  # nothing twice, nothing missed

    # The batch size may change between the parts; the last token resumes to nothing.
    assert await ids_from(user_stub, batch_size=7, resume_token=batches[1].resume_token) == [
        list(range(21, 26))
    ]
    assert await ids_from(user_stub, resume_token=batches[2].resume_token) == []


async def test_a_resumed_export_sees_rows_written_since(
    user_stub: Stub, engine: AsyncEngine
) -> None:
    await insert_users(engine, 4)
    call = user_stub.StreamUsers(api.StreamUsersRequest(batch_size=2))
    first = await call.read()
    call.cancel()
    await insert_users(engine, 1)  # id 5, after the point the client stopped
    rest = await ids_from(user_stub, batch_size=2, resume_token=first.resume_token)
    assert rest == [[3, 4], [5]]


async def test_a_token_works_only_with_the_filters_it_was_issued_for(
    user_stub: Stub, engine: AsyncEngine
) -> None:
    await insert_users(engine, 3)
    batch = await user_stub.StreamUsers(api.StreamUsersRequest(batch_size=1)).read()
    failure = await stream_fails(
        user_stub.StreamUsers(
            api.StreamUsersRequest(active_only=True, resume_token=batch.resume_token)
        )
    )
    assert failure.reason == "INVALID_ARGUMENT"
    assert "other filters" in failure.violations["resume_token"]


async def test_forged_tokens_and_page_tokens_are_refused(
    user_stub: Stub, engine: AsyncEngine
) -> None:
    await insert_users(engine, 3)
    batch = await user_stub.StreamUsers(api.StreamUsersRequest(batch_size=1)).read()
    payload, signature = batch.resume_token.split(".")
    forged = f"{payload}.{'A' * len(signature)}"
    page = await user_stub.ListUsers(api.ListUsersRequest(page_size=1))
    for token in (forged, "garbage", page.next_page_token):
        failure = await stream_fails(
            user_stub.StreamUsers(api.StreamUsersRequest(resume_token=token))
        )
        assert failure.code.name == "INVALID_ARGUMENT", token
        assert "resume_token" in failure.violations, token
