"""Timing that can be trusted: warm-up, device synchronisation, autorange, median and spread.

Only the call itself is inside the timer: building the method, moving data and computing errors
happen outside.  On CUDA each sample is bracketed by synchronisations, so the time covers the
kernels and not just their launch.

Autorange (as ``torch.utils.benchmark.Timer.blocked_autorange`` and ``timeit.Timer.autorange``):
after the warm-up, samples are taken until at least ``min_time`` seconds of timed calls have
accumulated *and* at least ``repeats`` samples exist.  A call faster than ``MIN_SAMPLE_S`` is
timed in blocks of k calls per sample, k = ⌈MIN_SAMPLE_S / t₁⌉ from the first call's time t₁, so
that each sample stands well above the timer's resolution; a sample is then the block's time / k.
``min_time = 0`` gives exactly ``repeats`` single calls (kdecli 0.3's behaviour).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed calls; on the CPU the
sampled RSS increase of the warm-up calls (``kdecli.measure.memory``), read there so that the sampling
thread never runs inside a timed call (with no warm-up, over the timed calls).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kdecli.measure.memory import RssSampler

MIN_SAMPLE_S = 1e-3  # a sample shorter than this is a block of several calls
MAX_BLOCK = 10_000  # calls in one block at most (a call of ~0.1 µs)
MAX_SAMPLES = 100_000  # a safety stop: no timing loops forever on a clock that does not move


@dataclass
class Timing:
    """Wall-clock seconds per call: median, inter-quartile range, and every sample.

    ``repeats`` is the number of samples; each sample is the mean of ``calls_per_sample`` calls.
    ``peak_memory_bytes`` comes from ``memory_source``: "cuda" (max allocated) or "rss" (sampled
    RSS increase); None when neither could be read.
    """

    median: float
    iqr: float
    repeats: int
    samples: list[float] = field(repr=False)
    peak_memory_bytes: int | None = None
    calls_per_sample: int = 1
    memory_source: str | None = None
    extrapolated_rows: int | None = None  # timed on this many query rows, scaled to all
    min_time: float = 0.0  # the seconds of timed calls asked for

    def as_dict(self) -> dict[str, object]:
        return {
            "median": self.median,
            "iqr": self.iqr,
            "repeats": self.repeats,
            "calls_per_sample": self.calls_per_sample,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_source": self.memory_source,
            "min_time": self.min_time,
        }

    def extrapolated(self, factor: float, rows: int) -> Timing:
        """Timed on ``rows`` query rows, every figure times ``factor`` for all of them; the
        memory of a part is not the whole's, so none."""
        return Timing(
            self.median * factor,
            self.iqr * factor,
            self.repeats,
            [s * factor for s in self.samples],
            None,
            self.calls_per_sample,
            None,
            rows,
            self.min_time,
        )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``fn()`` after ``warmup`` untimed calls: at least ``repeats`` samples and at least
    ``min_time`` seconds of timed calls (the module docstring); ``clock`` is for tests."""
    device = torch.device(device)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if not (min_time >= 0 and math.isfinite(min_time)):
        raise ValueError("min_time must be a finite number >= 0")
    sampler = RssSampler() if device.type == "cpu" else None
    if sampler is not None and warmup > 0:
        with sampler:
            for _ in range(warmup):
                fn()
    else:
        for _ in range(warmup):
            fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if sampler is not None and warmup == 0:
        with sampler:
            samples, block = _autorange(fn, device, repeats, min_time, clock)
    else:
        samples, block = _autorange(fn, device, repeats, min_time, clock)
    peak, source = None, None
    if device.type == "cuda":
        peak, source = torch.cuda.max_memory_allocated(device), "cuda"
    elif sampler is not None and sampler.peak_increase is not None:
        peak, source = sampler.peak_increase, "rss"
    median = statistics.median(samples)
    return Timing(
        median, _iqr(samples), len(samples), samples, peak, block, source, min_time=min_time
    )


def _autorange(fn, device, repeats: int, min_time: float, clock) -> tuple[list[float], int]:
    """Samples (seconds per call) and the calls per sample."""

    def timed(calls: int) -> float:
        synchronize(device)
        start = clock()
        for _ in range(calls):
            fn()
        synchronize(device)
        return clock() - start

    first = timed(1)
    samples, total, block = [first], first, 1
    if min_time > 0 and first < MIN_SAMPLE_S:
        block = min(MAX_BLOCK, math.ceil(MIN_SAMPLE_S / max(first, 1e-9)))
        samples, total = [], 0.0  # one call was too short to count as a sample on its own
    while (len(samples) < repeats or total < min_time) and len(samples) < MAX_SAMPLES:
        elapsed = timed(block)
        samples.append(elapsed / block)
        total += elapsed
    return samples, block


def _iqr(samples: list[float]) -> float:
    if len(samples) < 2:
        return 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[2] - q[0]
