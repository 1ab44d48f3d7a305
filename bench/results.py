"""What a benchmark produces: measurements, comparisons against a baseline, report sections."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when it is empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class Measurement:
    """One measured number (a rate) with its latency percentiles when there are any."""

    name: str
    value: float
    unit: str
    in_flight: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    details: str = ""
    # CPU time the server process (and its workers) spent per call, in ms: unlike the rate, it
    # hardly moves when other work shares the machine.
    server_cpu_ms: float | None = None
    # Transfers per transaction, where the measurement fixes it (the batch-statement rows).
    batch: int | None = None


@dataclass
class Comparison:
    """A measurement of the service beside the baseline it is judged against."""

    subject: Measurement
    baseline: Measurement | None = None
    # Minimum subject/baseline ratio the issue asks for; None: shown for information.
    target: float | None = None
    # A higher ratio the issue hopes for beside (or instead of) the target.
    stretch: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline.value <= 0 or self.subject.value < 0:
            return None
        return self.subject.value / self.baseline.value

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if self.target is None or ratio is None:
            return None
        return ratio >= self.target

    @property
    def stretch_met(self) -> bool | None:
        ratio = self.ratio
        if self.stretch is None or ratio is None:
            return None
        return ratio >= self.stretch


@dataclass
class Section:
    """One benchmark's table in the report, with its notes."""

    key: str
    title: str
    issue: int
    comparisons: list[Comparison] = field(default_factory=list)
    # Absolute checks that are not ratios, e.g. "RSS growth 12 MB (target <= 50 MB): met".
    checks: list[tuple[str, bool | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unavailable: str = ""
