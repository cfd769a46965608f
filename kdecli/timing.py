"""Timing that can be trusted: warm-up, device synchronisation, repeats, median and spread.

Only the call itself is inside the timer: building the method, moving data and computing errors
happen outside.  On CUDA each repeat is bracketed by synchronisations, so the time covers the
kernels and not just their launch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls: median, inter-quartile range, and every sample."""

    median: float
    iqr: float
    repeats: int
    samples: list[float] = field(repr=False)
    peak_memory_bytes: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "median": self.median,
            "iqr": self.iqr,
            "repeats": self.repeats,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object], device: torch.device | str, *, repeats: int = 5, warmup: int = 1
) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls."""
    device = torch.device(device)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Timing(statistics.median(samples), _iqr(samples), repeats, samples, peak)


def _iqr(samples: list[float]) -> float:
    if len(samples) < 2:
        return 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[2] - q[0]
