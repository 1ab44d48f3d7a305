"""docs/benchmarks.md: machine, command, a summary of the targets, a table per benchmark."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from bench.results import Comparison, Measurement, Section

METHOD = """\
- **Load generator** (`bench/load.py`): client processes started with `spawn`, each with its
  own event loop and grpc.aio channel, keep a fixed number of calls in flight (the total over
  all processes) in a closed loop. After a warm-up, each counts the calls that complete inside
  the measured window; latency is per call, p50/p99 by nearest rank over all processes.
- **Echo baseline** (`bench/echo.py`): a bare `grpc.aio.server()` in its own process with one
  unary method registered through `grpc.method_handlers_generic_handler`, bytes in and bytes
  out (no protobuf, no interceptors, no database). The client sends 120 bytes, about the size
  of a serialized `User`. It is the ceiling for any unary RPC served by one grpc.aio process.
- **The service** runs as `python -m service serve` (after `python -m service migrate`) on a
  database of its own, with `SHOP_LOG_LEVEL=WARNING`; every other setting is the default.
- **StreamUsers** is read by a client in its own process; the parent samples the server's RSS
  (including child processes) every 20 ms. The baseline is an asyncpg server-side cursor
  (`conn.cursor(..., prefetch=batch_size)`) over the same query and columns, in a REPEATABLE
  READ read-only transaction, like the service's snapshot. The 1M users are seeded with COPY
  and `VACUUM (ANALYZE)`. The first batch is timed from the call to its first message, on a
  service that has answered one StreamUsers before (the first one is reported beside it).
- **StreamUsers after ImportUsers**: a new database, migrated, one ImportUsers call of all
  the rows, then at once a StreamUsers timed to its first batch: no VACUUM, no manual ANALYZE.
  The baseline COPYs the same number of rows into the emptied table from one asyncpg
  connection.
- **Transfer**: accounts are opened and funded through the API (OpenAccount + Deposit), then
  16 concurrent callers (and 1) send transfers of 1.00 between two distinct random accounts,
  each with a fresh `request_id`. The baseline is `pgbench -b tpcb-like -M prepared -c 16 -j 2`
  on a database of its own initialised with `pgbench -i` (scale shown in the row), so 16
  clients mostly update different branches; the stretch baseline is the echo at the same
  number in flight. Transfers per transaction (the writer's mean batch size) count the
  distinct `created_at` (the transaction's start time) among the transfers the point wrote,
  warm-up included.
- **BatchTransfer**: a few calls in flight, each of 1000 transfers like the unary ones;
  transfers/s is calls/s times 1000, CPU is per transfer, latency per call. A call with any
  item refused counts as an error.
- **Batch statements**: the money writer's statements for one batch (claims, locks in id
  order, one writing statement; the service's own, from `repositories/ledger.py`) sent from one
  connection in the bench process, batches back to back, on one SQLAlchemy AsyncConnection
  and on raw asyncpg; their CPU is the bench process's per transfer.
- **UpsertUsers / ImportUsers** are called one at a time with new emails (all inserts). The
  baselines run from one asyncpg connection: the same multi-row `INSERT … ON CONFLICT (email)
  DO UPDATE … RETURNING xmax = 0` that UpsertUsers sends, and `copy_records_to_table` straight
  into `users`, one transaction per batch or call.
- **WatchChanges** (`bench/feed.py`, issue 21): latency from a write's RPC returning to a
  watcher process receiving that change (matched by type, id and version), writer processes
  pacing mixed single-row writes open loop; catch-up of a watcher resumed behind users inserted
  by `INSERT … SELECT generate_series`, beside StreamUsers over the same table; and
  BatchTransfer / UpsertUsers with the change log's statement triggers disabled (`ALTER TABLE …
  DISABLE TRIGGER *_log_*`, version triggers kept) against the same build with them on.
"""


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _rate(m: Measurement | None) -> str:
    return "-" if m is None else f"{_num(m.value)} {m.unit}"


def _ratio(c: Comparison) -> str:
    return "-" if c.ratio is None else f"{c.ratio:.2f}x"


def _target(c: Comparison) -> str:
    marks = {True: "met", False: "**not met**", None: ""}
    parts = []
    if c.target is not None:
        parts.append(f">= {c.target:g}x {marks[c.met]}".strip())
    if c.stretch is not None:
        parts.append(f"stretch >= {c.stretch:g}x {marks[c.stretch_met]}".strip())
    return "; ".join(parts) or "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def section_table(section: Section) -> list[str]:
    header = ["Measured", "In flight", "Rate", "p50 ms", "p99 ms", "Errors", "CPU ms/call"]
    header += ["Baseline", "Baseline rate", "Baseline CPU ms/call", "Ratio", "Target"]
    rows = []
    for c in section.comparisons:
        s, b = c.subject, c.baseline
        rows.append(
            [
                s.name,
                _num(s.in_flight) if s.in_flight else "-",
                _rate(s),
                _num(s.p50_ms, 2),
                _num(s.p99_ms, 2),
                f"{s.errors} ({s.details})" if s.errors else "0",
                _num(s.server_cpu_ms, 2),
                b.name if b else "-",
                _rate(b),
                _num(b.server_cpu_ms if b else None, 2),
                _ratio(c),
                _target(c),
            ]
        )
    return _table(header, rows)


def summary_table(sections: Sequence[Section]) -> list[str]:
    rows = []
    for section in sections:
        for c in section.comparisons:
            if c.target is not None or c.stretch is not None:
                where = f" @{c.subject.in_flight}" if c.subject.in_flight else ""
                rows.append(
                    [
                        f"#{section.issue}",
                        f"{c.subject.name}{where} vs {c.baseline.name if c.baseline else '-'}",
                        _ratio(c),
                        _target(c),
                    ]
                )
        for text, met in section.checks:
            mark = {True: "met", False: "**not met**", None: "for information"}[met]
            rows.append([f"#{section.issue}", text, "-", mark])
        if section.unavailable:
            rows.append([f"#{section.issue}", section.title, "-", section.unavailable])
    return _table(["Issue", "Measurement", "Ratio", "Target"], rows)


def _details(section: Section) -> list[str]:
    lines = []
    for c in section.comparisons:
        for m in (c.subject, c.baseline):
            if m is not None and m.details and not m.errors:
                lines.append(f"- {m.name}: {m.details}")
    return list(dict.fromkeys(lines))  # a shared baseline is listed once


def render(
    sections: Sequence[Section],
    machine: Sequence[tuple[str, str]],
    command: str,
    date: str,
    extras: Sequence[str],
    notes: Sequence[str],
    quick: bool,
) -> str:
    out = ["# Benchmarks", ""]
    if quick:
        out += ["> **Quick smoke run** (`--quick`): tiny sizes, numbers not representative.", ""]
    out += [
        f"Written by `bench/` on {date}; every number below comes from this one run.",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Machine",
        "",
        *_table(["", ""], [list(row) for row in machine]),
        "",
        "## Targets",
        "",
        *summary_table(sections),
        "",
        "Where a ratio falls short, [benchmark-profiles.md](benchmark-profiles.md) has the "
        "profile that explains it and what was tried.",
        "",
    ]
    for section in sections:
        out += [f"## {section.title} (issue {section.issue})", ""]
        if section.unavailable:
            out += [f"Not measured: {section.unavailable}.", ""]
            continue
        if section.comparisons:  # a section of checks alone has no table
            out += [*section_table(section), ""]
        marks = {True: "met", False: "**not met**", None: "for information"}
        out += [f"- {text}: {marks[met]}" for text, met in section.checks]
        out += _details(section)
        out += [f"- {note}" for note in section.notes]
        out.append("")
    pngs = [name for name in extras if name.endswith(".png")]
    if pngs:
        out += ["## Plots", "", *(f"![{name}]({name})" for name in pngs), ""]
    out += ["## Notes", "", *(f"- {note}" for note in notes)]
    out += [f"- Profile of the service: [{n}]({n})" for n in extras if n.endswith(".txt")]
    out += ["", "## How it is measured", "", METHOD]
    return "\n".join(out)


def general_notes(
    load_before: tuple[float, float, float], load_after: tuple[float, float, float], quick: bool
) -> list[str]:
    """Caveats that hold for every table: where the CPU went, how busy the machine was."""
    notes = [
        f"{os.cpu_count()} cores run everything at once: the client processes, the server under "
        "test and PostgreSQL. The baselines share the machine the same way, so ratios are "
        "fairer than absolute numbers, but a server that needs more CPU than its baseline "
        "loses twice: its own work and its clients compete for the same cores.",
        f"1-minute load average {load_before[0]:.2f} at the start and {load_after[0]:.2f} at "
        f"the end. Anything above {os.cpu_count()} means other work shared the machine, and "
        "every number here is lower and noisier than on a quiet one.",
        "A ratio below its target is reported as measured. `python -m bench --only KEY "
        "--profile` runs the service under cProfile and writes bench-profile.txt, to see "
        "where the time goes.",
    ]
    if quick:
        notes.insert(0, "Quick run: points of 1.5 s and small tables; use `make bench`.")
    return notes


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
