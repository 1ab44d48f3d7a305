"""A steady mixed load through the front door, bounded in calls and in time: GetUser callers,
Transfer callers with unique request_ids, and exporters that read StreamUsers slowly and resume
from their last token when a stream is cut. Every outcome is counted."""

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
# Spread over the replicas (LEAST_REQUEST), so each shutdown finds exports to cut: with 6 the
# odds that none is on the stopped replica are about (2/3)^6, 9% per stop.
EXPORTERS = 6
PAUSE = 0.01  # between one caller's calls: a steady load, not a flood on two shared cores
MAX_CALLS = 20_000  # per caller; the stop event ends them long before
CALL_TIMEOUT = 10.0
# The client's contract for a write with a request_id: send it again, same id, on UNAVAILABLE.
CLIENT_RETRIES = 3
EXPORT_BATCH = 200
# Per batch read (~15 KB): ~280 KB/s, so a 40,000-user export (~3 MB) takes ~11 s, and until
# its last ~0.6 MB (what Envoy and the reader hold) it is on its replica, held back by flow
# control. The tail a cut leaves, ~0.6 MB, reaches the reader in ~2 s, inside the 5 s grace.
EXPORT_PACE = 0.05
# The exporters' channel keeps grpc's 64 KiB stream window: by default the client grows it
# (BDP probing) to several MB on loopback, and a reader holding that much unread can't take a
# cut stream's tail within the replica's grace; Envoy's own windows are bounded in its config.
EXPORT_CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0)]
# How an export's call may end and still be resumed from the last token: UNAVAILABLE (a
# replica shutting down), INTERNAL (a stream reset: a replica killed, or a tail not delivered).
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
MAX_EXPORTS = 100
MAX_RESUMES = 40
STOP_TIMEOUT = 60.0


@dataclass
class Tally:
    """Calls made per method; errors per "Method CODE"; stream cuts resumed, by "CODE: details"."""

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
        async with (
            grpc.aio.insecure_channel(self.address) as channel,
            grpc.aio.insecure_channel(self.address, options=EXPORT_CHANNEL_OPTIONS) as exports,
        ):
            users = user_service_pb2_grpc.UserServiceStub(channel)
            accounts = account_service_pb2_grpc.AccountServiceStub(channel)
            exporter = user_service_pb2_grpc.UserServiceStub(exports)
            tasks = [asyncio.create_task(self._getter(users, i)) for i in range(GETTERS)]
            tasks += [
                asyncio.create_task(self._transferrer(accounts, i)) for i in range(TRANSFERRERS)
            ]
            tasks += [asyncio.create_task(self._exporter(exporter)) for _ in range(EXPORTERS)]
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
        """One whole export, read as one call and resumed from the last token after each cut;
        None if a call ended any other way."""
        ids: list[int] = []
        token = ""
        for _ in range(MAX_RESUMES):
            self.tally.calls["StreamUsers"] += 1
            request = users_pb.StreamUsersRequest(batch_size=EXPORT_BATCH, resume_token=token)
            call = users.StreamUsers(request, timeout=CALL_TIMEOUT * 6)
            try:
                async for batch in call:
                    ids.extend(user.id for user in batch.users)
                    token = batch.resume_token
                    await asyncio.sleep(EXPORT_PACE)
                return ids
            except grpc.aio.AioRpcError as error:
                if error.code() not in RESUMABLE:
                    self.tally.error("StreamUsers", error.code())
                    return None
                self.tally.cuts[f"{error.code().name}: {error.details()}"] += 1
            finally:
                call.cancel()
        self.tally.error("StreamUsers", grpc.StatusCode.DEADLINE_EXCEEDED)
        return None

    def summary(self) -> str:
        calls = ", ".join(f"{m} {n}" for m, n in sorted(self.tally.calls.items()))
        errors = ", ".join(f"{m} {n}" for m, n in sorted(self.tally.errors.items())) or "none"
        cuts = ", ".join(f"{n} x {c}" for c, n in sorted(self.tally.cuts.items())) or "none"
        return (
            f"calls: {calls}; errors: {errors}; streams cut and resumed: {cuts}; "
            f"exports finished: {len(self.exports)}; transfers acknowledged: "
            f"{len(self.acknowledged)} of {len(self.issued)}"
        )
