"""Soak: mixed traffic against a real server process for a bounded time, with faults injected:
its own PostgreSQL is stopped (immediate) and started again every `--restart-every` seconds, and
a share of calls is cancelled by the client at a random point. Reports errors by code, p99
latency and the server's memory over time as docs/soak.png and docs/reliability-soak.md.

    python -m bench.soak --minutes 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shop.v1 import account_service_pb2 as accounts_api
from shop.v1 import (
    account_service_pb2_grpc,
    order_service_pb2_grpc,
    resources_pb2,
    user_service_pb2_grpc,
)
from shop.v1 import order_service_pb2 as orders_api
from shop.v1 import user_service_pb2 as users_api
from sqlalchemy import func, select

from deploy.processes import start_serve, without_shop_settings
from service.db.engine import create_unpooled_engine
from service.db.migrate import upgrade
from service.db.models import Account, Transfer
from tests.faults.own_postgres import OwnPostgres, free_port, own_postgres
from tests.postgres import fresh_database_on

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 5.0
WINDOW = 5.0  # seconds per point on the plot
START_BALANCE = Decimal("100000.00")
ACCOUNTS = 8


@dataclass
class Record:
    """What the soak saw: each call (end time, latency, code) and the fault timeline."""

    started: float = field(default_factory=time.monotonic)
    calls: list[tuple[float, float, str]] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)
    memory: list[tuple[float, float]] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)
    ids: dict[str, list[int]] = field(default_factory=dict)

    def add(self, began: float, code: str) -> None:
        now = time.monotonic()
        self.calls.append((now - self.started, now - began, code))


class Client:
    """One client: a random mix of reads, writes and streams; some cancelled midway."""

    def __init__(self, channel: grpc.aio.Channel, record: Record, ids: dict[str, list[int]],
                 seed: int, cancel_share: float) -> None:  # fmt: skip
        self.users = user_service_pb2_grpc.UserServiceStub(channel)
        self.orders = order_service_pb2_grpc.OrderServiceStub(channel)
        self.accounts = account_service_pb2_grpc.AccountServiceStub(channel)
        self.record, self.ids = record, ids
        self.rng = random.Random(seed)
        self.seed = seed
        self.cancel_share = cancel_share
        self.n = 0

    def request(self) -> tuple[str, Any]:
        self.n += 1
        rng, account = self.rng, self.rng.choice(self.ids["accounts"])
        kind = rng.choices(["get", "transfer", "order", "list", "stream"], weights=[4, 3, 2, 2, 1])[
            0
        ]
        if kind == "get":
            return kind, self.accounts.GetAccount(
                accounts_api.GetAccountRequest(id=account), timeout=DEADLINE
            )
        if kind == "transfer":
            source, target = rng.sample(self.ids["accounts"], 2)
            return kind, self.accounts.Transfer(
                accounts_api.TransferRequest(
                    from_account_id=source,
                    to_account_id=target,
                    amount=f"{rng.randint(1, 500) / 100:.2f}",
                    request_id=f"soak-t-{self.seed}-{self.n}",
                ),
                timeout=DEADLINE,
            )
        if kind == "order":
            items = [resources_pb2.OrderItem(sku="SOAK", quantity=1, unit_price="3.00")]
            return kind, self.orders.CreateOrder(
                orders_api.CreateOrderRequest(
                    user_id=rng.choice(self.ids["users"]),
                    items=items,
                    request_id=f"soak-o-{self.seed}-{self.n}",
                ),
                timeout=DEADLINE,
            )
        if kind == "list":
            return kind, self.users.ListUsers(
                users_api.ListUsersRequest(page_size=20), timeout=DEADLINE
            )
        return kind, self.accounts.StreamTransfers(
            accounts_api.StreamTransfersRequest(account_id=account, batch_size=100),
            timeout=DEADLINE,
        )

    async def one(self) -> None:
        kind, call = self.request()
        began = time.monotonic()
        cancel_after = self.rng.uniform(0, 0.02) if self.rng.random() < self.cancel_share else None
        try:
            if kind == "stream":
                work: Any = self._drain(call)
            else:
                work = call
            if cancel_after is None:
                await work
                self.record.add(began, "OK")
            else:
                task = asyncio.ensure_future(work)
                await asyncio.sleep(cancel_after)
                call.cancel()
                try:
                    await task
                    self.record.add(began, "OK")
                except asyncio.CancelledError:
                    self.record.add(began, "CANCELLED (client)")
        except grpc.aio.AioRpcError as error:
            code = error.code()
            label = "CANCELLED (client)" if code == grpc.StatusCode.CANCELLED else code.name
            self.record.add(began, label)

    @staticmethod
    async def _drain(call: Any) -> None:
        async for _ in call:
            pass

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            await self.one()
            await asyncio.sleep(0.005)


async def seed(channel: grpc.aio.Channel) -> dict[str, list[int]]:
    users = user_service_pb2_grpc.UserServiceStub(channel)
    accounts = account_service_pb2_grpc.AccountServiceStub(channel)
    ids: dict[str, list[int]] = {"users": [], "accounts": []}
    for n in range(ACCOUNTS):
        user = await users.CreateUser(
            users_api.CreateUserRequest(email=f"soak{n}@example.com", first_name="S", last_name="K")
        )
        ids["users"].append(user.id)
        account = await accounts.OpenAccount(
            accounts_api.OpenAccountRequest(
                user_id=user.id, currency="EUR", request_id=f"soak-open-{n}"
            )
        )
        await accounts.Deposit(
            accounts_api.DepositRequest(
                account_id=account.id, amount=str(START_BALANCE), request_id=f"soak-seed-{n}"
            )
        )
        ids["accounts"].append(account.id)
    return ids


async def wait_serving(channel: grpc.aio.Channel, bound: float) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + bound
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not SERVING after {bound} s")
        await asyncio.sleep(0.2)


async def inject_faults(pg: OwnPostgres, record: Record, until: float, every: float,
                        outage: float) -> None:  # fmt: skip
    while time.monotonic() + every + outage + 10 < until:
        await asyncio.sleep(every)
        down = time.monotonic()
        await asyncio.to_thread(pg.stop, "immediate")
        await asyncio.sleep(outage)
        await asyncio.to_thread(pg.start)
        up = time.monotonic()
        record.outages.append((down - record.started, up - record.started))
        # Recovery: seconds from the database accepting connections to the first OK call.
        while time.monotonic() < up + 30:
            if any(t >= up - record.started and c == "OK" for t, _, c in record.calls[-200:]):
                record.recoveries.append(time.monotonic() - up)
                break
            await asyncio.sleep(0.05)


async def sample_memory(pid: int, record: Record, until: float) -> None:
    process = psutil.Process(pid)
    while time.monotonic() < until:
        record.memory.append((time.monotonic() - record.started, process.memory_info().rss / 2**20))
        await asyncio.sleep(1.0)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else float("nan")


def windows(record: Record) -> tuple[list[float], list[float], dict[str, list[int]]]:
    """Per WINDOW seconds: p99 latency of OK calls (ms) and counts by code."""
    by_window: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for t, latency, code in record.calls:
        by_window[int(t // WINDOW)].append((latency, code))
    codes = sorted({c for _, _, c in record.calls})
    xs, p99s, counts = [], [], {c: [] for c in codes}
    for w in range(max(by_window) + 1 if by_window else 0):
        calls = by_window.get(w, [])
        xs.append((w + 0.5) * WINDOW)
        p99s.append(p99([lat * 1000 for lat, c in calls if c == "OK"]))
        tally = Counter(c for _, c in calls)
        for c in codes:
            counts[c].append(tally[c])
    return xs, p99s, counts


def plot(record: Record, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, p99s, counts = windows(record)
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for ax in axes:
        for down, up in record.outages:
            ax.axvspan(down, up, color="tab:red", alpha=0.15)
    axes[0].plot(xs, p99s, marker=".", color="tab:blue")
    axes[0].set_ylabel(f"p99 latency of OK calls (ms, per {WINDOW:.0f} s)")
    axes[0].set_yscale("log")
    for code, ys in counts.items():
        if code != "OK":
            axes[1].plot(xs, ys, marker=".", label=code)
    axes[1].set_ylabel(f"errors per {WINDOW:.0f} s")
    axes[1].legend(loc="upper right", fontsize=8)
    if record.memory:
        axes[2].plot(
            [t for t, _ in record.memory], [m for _, m in record.memory], color="tab:green"
        )
    axes[2].set_ylabel("server RSS (MiB)")
    axes[2].set_xlabel("seconds (shaded: PostgreSQL stopped)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


async def ledger_consistent(url: str, ids: list[int]) -> tuple[bool, Decimal]:
    engine = create_unpooled_engine(url)
    try:
        async with engine.connect() as conn:
            total = await conn.scalar(select(func.sum(Account.balance)).where(Account.id.in_(ids)))
            moves = (
                await conn.execute(
                    select(Transfer.from_account_id, Transfer.to_account_id, Transfer.amount).where(
                        Transfer.request_id.startswith("soak-t-")
                    )
                )
            ).all()
            balances = dict(
                (r.id, r.balance)
                for r in await conn.execute(
                    select(Account.id, Account.balance).where(Account.id.in_(ids))
                )
            )
    finally:
        await engine.dispose()
    expected = dict.fromkeys(ids, START_BALANCE)
    for source, target, amount in moves:
        expected[source] -= amount
        expected[target] += amount
    return balances == expected and total == START_BALANCE * len(ids), Decimal(total or 0)


def report(record: Record, args: argparse.Namespace, consistent: bool, command: str) -> str:
    codes = Counter(c for _, _, c in record.calls)
    ok = [lat for _, lat, c in record.calls if c == "OK"]
    in_outage = [
        lat for t, lat, c in record.calls
        if c == "OK" and any(d <= t <= u + 5 for d, u in record.outages)
    ]  # fmt: skip
    steady = [
        lat for t, lat, c in record.calls
        if c == "OK" and not any(d <= t <= u + 5 for d, u in record.outages)
    ]  # fmt: skip
    memory = [m for _, m in record.memory]
    lines = [
        "## Soak run",
        "",
        f"Command: `{command}` ({args.clients} clients, {args.cancel_share:.0%} of calls "
        f"cancelled by the client at a random point within 20 ms, PostgreSQL stopped with "
        f"`pg_ctl stop -m immediate` every {args.restart_every:.0f} s for {args.outage:.0f} s, "
        f"client deadline {DEADLINE:.0f} s). Plot: [soak.png](soak.png).",
        "",
        f"- Calls: {len(record.calls)} in {args.minutes:g} min; "
        f"database restarts: {len(record.outages)}.",
        "- Outcomes by code: "
        + ", ".join(f"{code} {count}" for code, count in codes.most_common())
        + ".",
        f"- INTERNAL or UNKNOWN: {codes['INTERNAL'] + codes['UNKNOWN']}; "
        f"DEADLINE_EXCEEDED (a hang would show here): {codes['DEADLINE_EXCEEDED']}.",
        f"- p99 latency of OK calls: {p99(ok) * 1000:.1f} ms overall, "
        f"{p99(steady) * 1000:.1f} ms away from outages, "
        f"{p99(in_outage) * 1000:.1f} ms within 5 s after one.",
        "- Recovery (database accepting connections → first OK call): "
        + (", ".join(f"{r:.2f} s" for r in record.recoveries) or "none measured")
        + ".",
        f"- Server RSS: {memory[0]:.0f} MiB at start, {memory[-1]:.0f} MiB at the end, "
        f"{max(memory):.0f} MiB at most."
        if memory
        else "- Server RSS: not sampled.",
        f"- Ledger after the run (balances = start + transfers, sum unchanged): "
        f"{'consistent' if consistent else 'INCONSISTENT'}.",
        "",
    ]
    return "\n".join(lines)


def start_server(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = without_shop_settings()
    env.update(
        SHOP_DATABASE_URL=url,
        SHOP_GRPC_PORT=str(port),
        SHOP_LOG_LEVEL="ERROR",
        SHOP_POOL_TIMEOUT="2",
        SHOP_SHUTDOWN_DRAIN_DELAY="0",  # no balancer to tell: stop at once
        PYTHONUNBUFFERED="1",
    )
    with log.open("wb") as out:
        return start_serve(env, out)


async def drive(args: argparse.Namespace, pg: OwnPostgres, port: int, pid: int) -> Record:
    """Seed, then clients, faults and memory samples side by side until the time is up."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_serving(channel, 60)
        ids = await seed(channel)
        record = Record()
        record.ids = ids
        until = record.started + args.minutes * 60
        clients = [
            Client(channel, record, ids, seed=n, cancel_share=args.cancel_share)
            for n in range(args.clients)
        ]
        await asyncio.gather(
            *(c.run(until) for c in clients),
            inject_faults(pg, record, until, args.restart_every, args.outage),
            sample_memory(pid, record, until),
        )
    return record


def soak(args: argparse.Namespace) -> int:
    command = "python -m bench.soak " + " ".join(sys.argv[1:])
    out_dir = Path(args.out)
    log = out_dir / "soak-server.log" if args.keep_log else Path(os.devnull)
    with own_postgres() as pg, fresh_database_on(pg.url()) as url:
        upgrade(url)
        port = free_port()
        server = start_server(url, port, log)
        try:
            record = asyncio.run(drive(args, pg, port, server.pid))
            alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=30)
        consistent, _ = asyncio.run(ledger_consistent(url, record.ids["accounts"]))

    plot(record, out_dir / "soak.png", f"soak: {command}")
    text = report(record, args, consistent, command)
    if not alive:
        text += "\n**The server process died during the soak.**\n"
    header = (
        "# Reliability soak\n\n"
        "Written by `bench/soak.py`; docs/reliability.md lists the guarantees.\n\n"
    )
    (out_dir / "reliability-soak.md").write_text(header + text)
    print(text)
    codes = Counter(c for _, _, c in record.calls)
    bad = codes["INTERNAL"] + codes["UNKNOWN"] + codes["DEADLINE_EXCEEDED"]
    return 0 if alive and consistent and bad == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cancel-share", type=float, default=0.1)
    parser.add_argument("--restart-every", type=float, default=30.0)
    parser.add_argument("--outage", type=float, default=3.0)
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--keep-log", action="store_true", help="server log to OUT/soak-server.log")
    sys.exit(soak(parser.parse_args()))


if __name__ == "__main__":
    main()
