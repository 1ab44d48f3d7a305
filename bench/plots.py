"""PNG plots of the unary benchmarks: throughput and latency against calls in flight."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.results import Measurement, Section


def _series(sections: Sequence[Section]) -> dict[str, list[Measurement]]:
    """Unary measurements by name, each series in ascending in-flight order."""
    series: dict[str, dict[int, Measurement]] = defaultdict(dict)
    for section in sections:
        for c in section.comparisons:
            # Baseline first, so echo heads the legend.
            for m in (c.baseline, c.subject):
                if m is not None and m.unit == "req/s" and m.in_flight:
                    series[m.name][m.in_flight] = m
    return {name: [by[k] for k in sorted(by)] for name, by in series.items()}


def _axes(title: str, ylabel: str, ticks: list[int]) -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("calls in flight (all client processes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def unary_plots(sections: Sequence[Section], out_dir: Path) -> list[str]:
    """Writes bench-unary-throughput.png and bench-unary-latency.png; returns their names."""
    series = _series(sections)
    if not series:
        return []
    ticks = sorted({m.in_flight or 1 for points in series.values() for m in points})
    fig, ax = _axes("Unary throughput", "requests / s", ticks)
    for name, points in series.items():
        x = [m.in_flight or 0 for m in points]
        ax.plot(x, [m.value for m in points], marker="o", label=name)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    throughput = "bench-unary-throughput.png"
    fig.tight_layout()
    fig.savefig(out_dir / throughput)
    plt.close(fig)

    fig, ax = _axes("Unary latency (solid p50, dashed p99)", "milliseconds", ticks)
    ax.set_yscale("log")
    for name, points in series.items():
        x = [m.in_flight or 0 for m in points]
        (line,) = ax.plot(x, [m.p50_ms or 0.0 for m in points], marker="o", label=name)
        p99 = [m.p99_ms or 0.0 for m in points]
        ax.plot(x, p99, marker="x", linestyle="--", color=line.get_color())
    ax.legend(fontsize=8)
    latency = "bench-unary-latency.png"
    fig.tight_layout()
    fig.savefig(out_dir / latency)
    plt.close(fig)
    return [throughput, latency]


def transfer_plot(sections: Sequence[Section], out_dir: Path) -> list[str]:
    """Writes bench-transfer-batches.png: the writer's batch statements by batch size, beside
    pgbench, Transfer at 16 in flight and BatchTransfer; returns its name."""
    section = next((s for s in sections if s.key == "transfer" and s.comparisons), None)
    if section is None:
        return []
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    lines: dict[str, float] = {}
    for c in section.comparisons:
        m = c.subject
        if m.batch is not None:
            curves[m.name.split(",")[0]][m.batch] = m.value
        elif m.in_flight and m.in_flight > 1:
            lines[f"{m.name} @{m.in_flight}"] = m.value
        if c.baseline is not None and c.baseline.unit == "tps":
            lines[c.baseline.name] = c.baseline.value
    if not curves:
        return []
    ticks = sorted({b for points in curves.values() for b in points})
    fig, ax = _axes("The writer's batch statements from one connection", "transfers / s", ticks)
    ax.set_xlabel("transfers per batch (one transaction)")
    for name, points in curves.items():
        x = sorted(points)
        ax.plot(x, [points[b] for b in x], marker="o", label=name)
    for i, (name, value) in enumerate(lines.items()):
        ax.axhline(value, linestyle=("--", ":", "-.")[i % 3], color=f"C{i + 2}", label=name)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    name = "bench-transfer-batches.png"
    fig.tight_layout()
    fig.savefig(out_dir / name)
    plt.close(fig)
    return [name]
