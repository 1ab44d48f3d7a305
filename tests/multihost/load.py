"""A steady mixed load through the front door, bounded in calls and in time: GetUser callers,
Transfer callers with unique request_ids, and an exporter that reads StreamUsers slowly and
resumes from its last token when a stream is cut. Every outcome is counted."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from shop.v1 import account_service_pb2 as accounts_pb
from shop.v1 import account_service_pb2_grpc, user_service_pb2_grpc
from shop.v1 import user_service_pb2 as users_pb

T = TypeVar("T")

GETTERS = 3
TRANSFERRERS = 3
EXPORTERS = 3  # spread over the replicas, so each shutdown finds an export to cut
PAUSE = 0.01  # between one caller's calls: a steady load, not a flood on two shared cores
MAX_CALLS = 20_000  # per caller; the stop event ends them long before
CALL_TIMEOUT = 10.0
# The client's contract for a write with a request_id: send it again, same id, on UNAVAILABLE.
CLIENT_RETRIES = 3
EXPORT_BATCH = 200
EXPORT_PACE = 0.05  # per batch read: a 20,000-user export takes ~5 s, longer than the drain
# Each export is read as several calls: after CHUNK batches the reader cancels and resumes from
# its last token, so every export crosses replicas (Envoy balances each call) whether or not
# a shutdown cuts it. Shutdowns rarely do: with Envoy's default 256 MiB HTTP/2 windows a
# replica hands a whole export (~2 MB) to Envoy in about 0.1 s (docs/scale-out.md).
CHUNK = 20
MAX_EXPORTS = 100
MAX_RESUMES = 40
STOP_TIMEOUT = 60.0


@dataclass
class Tally:
    """Calls made per method; errors per "Method CODE"; stream cuts resumed, by code."""

    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    cuts: Counter[str] = field(default_factory=Counter)

    def error(self, method: str, code: grpc.StatusCode) -> None:
        self.errors[f"{method} {code.name}"] += 1


@dataclass
class MixedLoad:
    """Callers through `address` (Envoy) until the scenario ends, each bounded by MAX_CALLS."""

    address: str
    user_ids: list[int]
    account_ids: list[int]
    prefix: str
    tally: Tally = field(default_factory=Tally)
    acknowledged: dict[str, int] = field(default_factory=dict)  # request_id -> transfer id
    issued: set[str] = field(default_factory=set)
    exports: list[list[int]] = field(default_factory=list)  # the ids each finished export sent
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def while_running(self, scenario: Awaitable[T]) -> T:
        """Run the load around `scenario`; stop it when the scenario ends, however it ends."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            accounts = account_service_pb2_grpc.AccountServiceStub(channel)
            tasks = [asyncio.create_task(self._getter(users, i)) for i in range(GETTERS)]
            tasks += [
                asyncio.create_task(self._transferrer(accounts, i)) for i in range(TRANSFERRERS)
            ]
            tasks += [asyncio.create_task(self._exporter(users)) for _ in range(EXPORTERS)]
            try:
                return await scenario
            finally:
                self.stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), STOP_TIMEOUT)

    async def _unary(self, method: str, call: Callable[..., Any], request: Any) -> Any:
        """The reply, or the status code of the error (counted)."""
        self.tally.calls[method] += 1
        try:
            return await call(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            self.tally.error(method, error.code())
            return error.code()

    async def _getter(self, users: user_service_pb2_grpc.UserServiceStub, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(MAX_CALLS):
            if self.stop.is_set():
                return
            request = users_pb.GetUserRequest(id=rng.choice(self.user_ids))
            await self._unary("GetUser", users.GetUser, request)
            await asyncio.sleep(PAUSE)

    async def _transferrer(
        self, accounts: account_service_pb2_grpc.AccountServiceStub, k: int
    ) -> None:
        rng = random.Random(1000 + k)
        for n in range(MAX_CALLS):
            if self.stop.is_set():
                return
            source, target = rng.sample(self.account_ids, 2)
            request_id = f"{self.prefix}{k}-{n}"
            self.issued.add(request_id)
            request = accounts_pb.TransferRequest(
                from_account_id=source, to_account_id=target, amount="1.00", request_id=request_id
            )
            for attempt in range(CLIENT_RETRIES + 1):
                outcome = await self._unary("Transfer", accounts.Transfer, request)
                if not isinstance(outcome, grpc.StatusCode):
                    self.acknowledged[request_id] = outcome.id
                    break
                if outcome != grpc.StatusCode.UNAVAILABLE:
                    break
                await asyncio.sleep(0.05 * 2**attempt)
            await asyncio.sleep(PAUSE)

    async def _exporter(self, users: user_service_pb2_grpc.UserServiceStub) -> None:
        for _ in range(MAX_EXPORTS):
            if self.stop.is_set():
                return
            ids = await self._export(users)
            if ids is not None:
                self.exports.append(ids)

    async def _export(self, users: user_service_pb2_grpc.UserServiceStub) -> list[int] | None:
        """One whole export, resumed from the last token after each chunk and after each
        UNAVAILABLE cut; None if a call ended any other way."""
        ids: list[int] = []
        token = ""
        for _ in range(MAX_RESUMES):
            self.tally.calls["StreamUsers"] += 1
            request = users_pb.StreamUsersRequest(batch_size=EXPORT_BATCH, resume_token=token)
            call = users.StreamUsers(request, timeout=CALL_TIMEOUT * 6)
            batches = 0
            try:
                async for batch in call:
                    ids.extend(user.id for user in batch.users)
                    token = batch.resume_token
                    batches += 1
                    await asyncio.sleep(EXPORT_PACE)
                    if batches == CHUNK:
                        break
                else:
                    return ids
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    self.tally.error("StreamUsers", error.code())
                    return None
                self.tally.cuts[error.code().name] += 1
            finally:
                call.cancel()
        self.tally.error("StreamUsers", grpc.StatusCode.DEADLINE_EXCEEDED)
        return None

    def summary(self) -> str:
        calls = ", ".join(f"{m} {n}" for m, n in sorted(self.tally.calls.items()))
        errors = ", ".join(f"{m} {n}" for m, n in sorted(self.tally.errors.items())) or "none"
        cuts = ", ".join(f"{c} {n}" for c, n in sorted(self.tally.cuts.items())) or "none"
        return (
            f"calls: {calls}; errors: {errors}; streams cut and resumed: {cuts}; "
            f"exports finished: {len(self.exports)}; transfers acknowledged: "
            f"{len(self.acknowledged)} of {len(self.issued)}"
        )
