"""Figures for benchmarks: medians over repeated runs, with p99 and the spread between runs.

A figure is measured as ``runs`` independent runs of ``n`` samples each. Its p50 and p99
are the medians over the runs of each run's p50 and p99; ``spread`` is the lowest and
highest run p50, so a noisy machine shows up as a wide spread instead of a wrong number.
"""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Sequence


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        raise ValueError("no samples")
    i = min(len(sorted_xs) - 1, max(0, int(round(q * (len(sorted_xs) - 1)))))
    return sorted_xs[i]


@dataclass
class Figure:
    suite: str
    name: str
    unit: str  # "us", "ms", "calls/s", "bytes", "ratio", "MiB"
    p50: float
    p99: float | None = None
    spread: tuple[float, float] | None = None
    runs: int = 1
    n: int = 0
    target: str | None = None  # human-readable, e.g. "p50 <= 20 us"
    met: bool | None = None  # None: no target
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(suite: str, name: str, unit: str, runs: Sequence[Sequence[float]], *,
              target_max_p50: float | None = None, target: str | None = None, **extra: Any) -> Figure:
    """A latency-like figure (lower is better) from per-run samples."""
    p50s, p99s = [], []
    for samples in runs:
        xs = sorted(samples)
        p50s.append(percentile(xs, 0.5))
        p99s.append(percentile(xs, 0.99))
    p50 = statistics.median(p50s)
    met = None if target_max_p50 is None else p50 <= target_max_p50
    if target is None and target_max_p50 is not None:
        target = f"p50 <= {target_max_p50:g} {unit}"
    return Figure(suite, name, unit, round(p50, 3), round(statistics.median(p99s), 3),
                  (round(min(p50s), 3), round(max(p50s), 3)), len(runs), sum(len(r) for r in runs), target, met,
                  dict(extra))


def rate_figure(suite: str, name: str, unit: str, per_run: Sequence[float], *, target_min: float | None = None,
                target: str | None = None, **extra: Any) -> Figure:
    """A throughput-like figure (higher is better): the median over runs, spread min..max."""
    value = statistics.median(per_run)
    met = None if target_min is None else value >= target_min
    if target is None and target_min is not None:
        target = f">= {target_min:g} {unit}"
    return Figure(suite, name, unit, round(value, 3), None, (round(min(per_run), 3), round(max(per_run), 3)),
                  len(per_run), len(per_run), target, met, dict(extra))


def timed_runs(fn: Callable[[], None], *, runs: int, n: int, clock: Callable[[], int],
               each_run: Callable[[], ContextManager[Any]] = nullcontext) -> list[list[float]]:
    """``runs`` runs of ``n`` timed calls of ``fn`` (nanosecond clock), in microseconds; each run
    inside ``each_run()`` (e.g. with the garbage collector off)."""
    out = []
    for _ in range(runs):
        samples = []
        with each_run():
            for _ in range(n):
                t = clock()
                fn()
                samples.append((clock() - t) / 1000.0)
        out.append(samples)
    return out


def timed_decisions(supervisor: Any, requests: Sequence[bytes]) -> list[float]:
    """One run of ``Supervisor.authorize``: per-call latency in microseconds; each reservation is
    released after its sample, outside the timed region."""
    authorize, release, clock = supervisor.authorize, supervisor.ledger.release, time.perf_counter_ns
    samples = []
    for req in requests:
        t = clock()
        ok = authorize(req)
        samples.append((clock() - t) / 1000.0)
        release(ok.reservation)
    return samples


class NoGC:
    """The garbage collector off while inside (reference counting still frees almost everything)."""

    def __enter__(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: Any) -> None:
        if self.was_enabled:
            gc.enable()
