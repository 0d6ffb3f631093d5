"""Timing helper shared by the benchmarks: medians taken round-robin, so a change of machine load
during the run affects every compared variant alike (the benchmarks report ratios)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def round_robin_medians(jobs: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each job, timing the jobs in turn within every repeat."""
    for _ in range(warmup):
        for job in jobs.values():
            job()
    times: dict[str, list] = {label: [] for label in jobs}
    for _ in range(repeats):
        for label, job in jobs.items():
            start = time.perf_counter()
            job()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}
