"""`python -m bench [--quick] [--only stream,unary,workers,transfer,bulk,imported,changes]`: seeds a
database of its own, starts the service as a subprocess, runs the selected benchmarks beside
their baselines, prints the tables and writes docs/benchmarks.md with PNG plots."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench import machine, plots, profiles, report, seed
from bench.postgres import postgres_server
from bench.processes import ROOT, ServerProcess, run_migrations
from bench.progress import Progress
from bench.results import Section
from bench.sizes import FULL, QUICK, Sizes
from bench.suites import SUITES, Run


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and 1.5 s points: a smoke run"
    )
    parser.add_argument(
        "--only",
        default=",".join(SUITES),
        help=f"comma-separated benchmarks to run (default: all of {','.join(SUITES)})",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the service under cProfile and write bench-profile.txt (slows it down: "
        "use it to explain a ratio, with --only, not for the published numbers)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="where benchmarks.md and the PNGs go (default: docs/; with --quick a temp dir, "
        "so a smoke run never overwrites the published report)",
    )
    args = parser.parse_args(argv)
    args.only = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = sorted(set(args.only) - set(SUITES))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if args.output is None:
        quick_dir = Path(tempfile.gettempdir()) / "shop-bench-quick"
        args.output = quick_dir if args.quick else ROOT / "docs"
    return args


async def run_suites(
    sizes: Sizes, only: list[str], progress: Progress, profile: Path | None
) -> tuple[list[Section], str]:
    async with postgres_server() as postgres:
        version = await postgres.version()
        progress("setup", f"PostgreSQL {version} at {postgres.url.render_as_string()}")
        async with postgres.database("service") as database:
            url = postgres.service_url(database)
            progress("setup", f"migrating {database}")
            await asyncio.to_thread(run_migrations, url)
            progress("setup", f"seeding {sizes.stream_rows:,} users with COPY")
            max_id = await seed.copy_users(postgres.dsn(database), sizes.stream_rows)
            with ServerProcess.service(url, profile=profile) as service:
                await service.wait_ready()
                progress("setup", f"service serving on {service.target}")
                run = Run(sizes, postgres, database, service, max_id, progress)
                sections: list[Section] = []
                for key in SUITES:
                    if key in only:
                        progress(key, "start")
                        before = os.getloadavg()[0]
                        found = await SUITES[key](run)
                        # The machine is shared: say how busy it was around each benchmark.
                        load = (
                            f"1-minute load average {before:.2f} when this benchmark started, "
                            f"{os.getloadavg()[0]:.2f} when it ended (its own load included)."
                        )
                        for section in found:
                            section.notes.append(load)
                        sections += found
        return sections, version


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    progress = Progress()
    sizes = QUICK if args.quick else FULL
    args.output.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shop-bench-prof-") as tmp:
        prof = Path(tmp) / "service.prof" if args.profile else None
        sections, version = asyncio.run(run_suites(sizes, args.only, progress, prof))
        extras = plots.unary_plots(sections, args.output)
        extras += plots.transfer_plot(sections, args.output)
        if prof is not None:
            extras.append(profiles.write_summary(prof, args.output / "bench-profile.txt"))
    notes = report.general_notes(load_before, os.getloadavg(), quick=args.quick)
    text = report.render(
        sections,
        machine.describe(version),
        command,
        datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        extras,
        notes,
        args.quick,
    )
    report.write(args.output / "benchmarks.md", text)
    print("\n".join(report.summary_table(sections)))
    for section in sections:
        print(f"\n{section.title} (issue {section.issue})")
        print("\n".join(report.section_table(section)) if not section.unavailable else "n/a")
    progress("done", f"report written to {args.output / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
