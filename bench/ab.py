"""`python -m bench.ab [--workload GetUser] [--in-flight 16] [--rounds 3] REV [REV ...]`: the
server's CPU per call of two or more builds, measured in turns on the same database.

A REV is a git revision (checked out in a temporary worktree, its batch encoder compiled),
`.` for this working tree as it is, or `echo` for the bare grpc.aio echo (bench/echo.py). Each
round starts each build's `python -m service serve` in turn (one process, as the bench's one-
process rows), warms it up for a second, then drives the workload from two client processes
and prints calls/s, p50/p99 and the server's CPU per call from /proc. Alternating builds round
by round is what makes a difference of 10% visible on a machine whose other load moves the
absolute figures by more than that; compare the medians.

The database is made for the run (10,000 users by COPY, 100 funded accounts through the API)
and migrated by this working tree's migrations: the builds compared must share the schema.
Uncommitted changes of a build are measured by committing them first, or with `.`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import seed
from bench.load import LoadSpec, run_load
from bench.postgres import postgres_server
from bench.processes import ROOT, ServerProcess, run_migrations
from bench.workloads import Params

USERS = 10_000
ACCOUNTS = 100
CLIENT_PROCESSES = 2
WARMUP = 1.0


@contextlib.contextmanager
def checkouts(revs: list[str]) -> Iterator[dict[str, Path]]:
    """Each REV's directory: a detached worktree with its encoder built, ROOT for `.`; echo's
    is ROOT (its server is bench/echo.py). The worktrees are removed at the end."""
    with tempfile.TemporaryDirectory(prefix="shop-ab-") as tmp:
        made: list[Path] = []
        dirs: dict[str, Path] = {}
        try:
            for rev in revs:
                if rev in (".", "echo"):
                    dirs[rev] = ROOT
                    continue
                path = Path(tmp) / f"{len(made)}-{rev.replace('/', '_')}"
                git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev]
                subprocess.run(git, check=True, capture_output=True)
                made.append(path)
                build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
                subprocess.run(build, cwd=path, check=True, capture_output=True)
                dirs[rev] = path
            yield dirs
        finally:
            for path in made:
                remove = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)]
                subprocess.run(remove, check=False, capture_output=True)


def server(rev: str, path: Path, url: str) -> ServerProcess:
    if rev == "echo":
        return ServerProcess.echo()
    return ServerProcess.service(url, cwd=path)


async def measure(
    rev: str, path: Path, url: str, args: argparse.Namespace, params: Params
) -> float:
    workload = "echo" if rev == "echo" else args.workload

    def load(seconds: float) -> LoadSpec:
        return LoadSpec(
            proc.target, workload, args.in_flight, seconds, 0.0, CLIENT_PROCESSES, params
        )

    with server(rev, path, url) as proc:
        await proc.wait_ready()
        # A load of its own first (connections, statements, caches warm), outside the CPU read.
        await asyncio.to_thread(run_load, load(WARMUP))
        before = proc.cpu_seconds()
        m = await asyncio.to_thread(run_load, load(args.seconds))
        calls = m.value * args.seconds
        cpu_us = (proc.cpu_seconds() - before) / calls * 1e6 if calls else float("nan")
    print(
        f"  {rev:>12}: {m.value:8,.0f} calls/s  p50 {m.p50_ms or 0:6.2f} ms  "
        f"p99 {m.p99_ms or 0:6.2f} ms  server CPU {cpu_us:5.0f} us/call  errors {m.errors}",
        flush=True,
    )
    return cpu_us


async def main(args: argparse.Namespace) -> None:
    async with postgres_server() as postgres, postgres.database("ab") as name:
        url = postgres.service_url(name)
        run_migrations(url)
        max_id = await seed.copy_users(postgres.dsn(name), USERS)
        with ServerProcess.service(url) as seeder:
            await seeder.wait_ready()
            accounts = await seed.open_funded_accounts(
                seeder.target, list(range(1, ACCOUNTS + 1)), "1000000000.00"
            )
        params = {"max_id": max_id, "accounts": accounts, "size": args.batch}
        with checkouts(args.revs) as dirs:
            cpu: dict[str, list[float]] = {rev: [] for rev in args.revs}
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}/{args.rounds}, {args.workload} @{args.in_flight}")
                for rev in args.revs:
                    cpu[rev].append(await measure(rev, dirs[rev], url, args, params))
    print("server CPU per call, median of the rounds (each round's in brackets):")
    for rev, values in cpu.items():
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {rev:>12}: {statistics.median(values):5.0f} us  [{rounds}]")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("revs", nargs="+", metavar="REV", help="git revision, `.` or `echo`")
    parser.add_argument("--workload", default="GetUser", help="GetUser, Transfer, ...")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured per round")
    parser.add_argument("--batch", type=int, default=100, help="BatchTransfer's transfers per call")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
