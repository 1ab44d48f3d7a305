"""`python -m bench.transfer_writes`: the BatchTransfer point alone at make bench's full sizes
(1000 per call, 4 in flight, 1000 accounts, 8 s) beside pgbench tpcb-like at its full sizes
(-s 16, 16 clients, 8 s), with what the point wrote per transfer (bench/write_cost.py). For
issue 22's before/after figures without running the whole transfer section; it prints, and
writes nothing to docs/."""

from __future__ import annotations

import asyncio
import os

from bench import seed, write_cost
from bench.postgres import postgres_server
from bench.processes import ServerProcess, run_migrations
from bench.progress import Progress
from bench.sizes import FULL
from bench.suites import Run, _batch_transfer, _pgbench


async def main() -> None:
    s = FULL
    progress = Progress()
    async with postgres_server() as postgres, postgres.database("service") as database:
        url = postgres.service_url(database)
        await asyncio.to_thread(run_migrations, url)
        max_id = await seed.copy_users(postgres.dsn(database), s.transfer_accounts)
        with ServerProcess.service(url) as service:
            await service.wait_ready()
            run = Run(s, postgres, database, service, max_id, progress)
            accounts = await seed.open_funded_accounts(
                service.target, list(range(1, s.transfer_accounts + 1)), "1000000.00"
            )
            pgbench = await _pgbench(run)
            async with write_cost.measured(run.dsn) as costs:
                batch = await _batch_transfer(run, accounts)
    [cost] = costs
    print(f"pgbench tpcb-like: {pgbench.value:,.0f} tps ({pgbench.details})")
    print(
        f"{batch.name}: {batch.value:,.0f} transfers/s, {batch.value / pgbench.value:.2f}x "
        f"pgbench; p50 {batch.p50_ms or 0:.1f} ms, p99 {batch.p99_ms or 0:.1f} ms per call; "
        f"server CPU {batch.server_cpu_ms or 0:.3f} ms per transfer; {batch.details}"
    )
    print("\n".join(cost.lines()))
    print(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
