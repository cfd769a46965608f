"""The figures a measurement yields, as records every experiment's document shares.

- ``Environment``: where a figure was measured (device, dtype, threads, versions).
- ``Summary``: one error metric of one record over its batch×head *slices* — mean, max, every
  slice — with a row-sampled reference's ``Interval``.  It is what one measured call gives.
- ``SeedStats``: one figure of one setting over its *seeds* — mean, sample std, the seeds'
  values, and where the figure has them, the max behind it and the bounds of an interval.  It is
  what a table row or a drift result shows (``kdecli.experiments.compare.aggregate``, drift), built
  from ``Summary``s or from plain values.  The two are different concepts: a Summary lives inside
  one record and keeps its slices; SeedStats lives across records and keeps the spread over seeds.
- ``TimeStat``: seconds per call (median, inter-quartile range) and the call's peak memory.
- ``InputInfo`` (with its ``Shape``): the input as run; ``Floors``: the errors of the two trivial
  answers; ``ReferenceInfo``: which exact reference the errors are measured against (every row,
  or a row sample); ``ResultTime``: a record's timings beside exact attention's.
- ``Diagnostics``: why one call's estimate is wrong (density, mass recall, selection vs
  estimation error, row-sum error; ``kdecli.measure.diagnostics`` computes them).

Every record's dict form is derived from its fields (``kdecli.records``); the documents of the
experiments (``kdecli.experiments.compare.records``, scale, drift) are built around these.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from kdecli.records import Reader, Record, json_field


@dataclass(frozen=True)
class Environment(Record):
    """Where a result was measured."""

    torch: str = json_field(absent="?")
    device: str = json_field()
    device_name: str = json_field(absent="")
    dtype: str = json_field()
    threads: int = json_field(absent=0)
    python: str = json_field(absent="?")

    def label(self) -> str:
        """``float32 on cpu (AMD EPYC …)``: how a report names the machine and precision."""
        name = f" ({self.device_name})" if self.device_name else ""
        return f"{self.dtype} on {self.device}{name}"


@dataclass(frozen=True)
class Interval(Record):
    """A confidence interval (``level``, e.g. 0.95) of an estimated metric: of its mean over
    slices (``low``, ``high``) and of each slice's value."""

    low: float | None
    high: float | None
    per_slice_low: tuple[float | None, ...] = ()
    per_slice_high: tuple[float | None, ...] = ()
    level: float = 0.95

    json_order = ("level", "low", "high", "per_slice_low", "per_slice_high")


@dataclass(frozen=True)
class Summary(Record):
    """One metric of one record over batch×head slices: mean, max, and every slice.

    Under a row-sampled reference (``reference.mode`` "rows") a value is an estimate: ``interval``
    holds its confidence interval, ``lower_bound`` marks a value that can only be below the truth
    (a max over the sampled rows), and a metric the sample cannot measure has no values and a
    ``note`` that says why.  The three are written only when set, so full-reference documents read
    as before.  (Over seeds, a setting's figure is a ``SeedStats``.)
    """

    mean: float | None
    max: float | None
    per_slice: tuple[float | None, ...] = ()
    interval: Interval | None = json_field(None, omit="none")
    lower_bound: bool = json_field(False, omit="falsy")
    note: str | None = json_field(None, omit="none")

    @classmethod
    def unavailable(cls, note: str) -> Summary:
        """A metric this reference cannot measure, and why."""
        return cls(None, None, note=note)

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        """Summarise per-slice values (a non-finite slice makes the mean and max non-finite)."""
        finite = all(math.isfinite(v) for v in values)
        mean = sum(values) / len(values) if finite else math.inf
        return cls(mean, max(values) if finite else math.inf, tuple(values))


@dataclass(frozen=True)
class SeedStats(Record):
    """One figure over seeds (or over the layers of a capture): mean, sample std (0 for one value;
    None where a value is not finite, and the mean is then inf) and every seed's value.

    Where the figure is a mean over slices (compare's errors) it also keeps ``max``, the largest
    slice value of any seed, and under a row-sampled reference ``low`` and ``high``, the means over
    seeds of each record's interval bounds: every seed is measured on the same rows and the same
    bootstrap resamples, so its estimates move together (comonotone); the quantile of their mean
    is then the mean of their quantiles, and where they are less than fully dependent this
    interval is the wider one (conservative).  ``lower_bound``: the values are maxima over the
    sampled rows, lower bounds of the true ones.  The four are written only when set, so a drift
    document holds mean, std and per_seed alone.
    """

    mean: float | None
    std: float | None
    per_seed: tuple[float | None, ...] = ()
    max: float | None = json_field(None, omit="none")
    low: float | None = json_field(None, omit="none")
    high: float | None = json_field(None, omit="none")
    lower_bound: bool = json_field(False, omit="falsy")

    @classmethod
    def of(cls, values: Sequence[float], **extra) -> SeedStats:
        """Mean and sample std of ``values`` (``extra``: max, low, high, lower_bound)."""
        if not values:
            return cls(None, None, (), **extra)
        if not all(math.isfinite(v) for v in values):
            return cls(math.inf, None, tuple(values), **extra)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, tuple(values), **extra)

    @classmethod
    def over(cls, parts: Sequence[Summary | SeedStats]) -> SeedStats | None:
        """The figure over records' ``Summary``s (one per seed) or settings' ``SeedStats`` (one
        per layer): the mean and std of their means, the largest of their maxima (inf where one is
        null: a non-finite value JSON could not hold), the mean of their interval bounds when every
        one has them, and whether any is a lower bound.  None when no part has a mean."""
        measured = [p for p in parts if p.mean is not None]
        if not measured:
            return None
        maxima = [p.max for p in parts if getattr(p, "note", None) is None]
        bounds = [_bounds(p) for p in measured]
        low = high = None
        if all(b is not None for b in bounds):
            low = statistics.fmean(b[0] for b in bounds)
            high = statistics.fmean(b[1] for b in bounds)
        return cls.of(
            [p.mean for p in measured],
            max=math.inf if None in maxima else max(maxima, default=None),
            low=low,
            high=high,
            lower_bound=any(p.lower_bound for p in parts),
        )

    @property
    def worst(self) -> float | None:
        """The largest value behind the figure: ``max`` where kept, else the largest seed's."""
        if self.max is not None:
            return self.max
        values = [v for v in self.per_seed if v is not None]
        return max(values) if values else None


def _bounds(part: Summary | SeedStats) -> tuple[float, float] | None:
    if isinstance(part, SeedStats):
        low, high = part.low, part.high
    else:
        low, high = (
            (None, None) if part.interval is None else (part.interval.low, part.interval.high)
        )
    return None if low is None or high is None else (low, high)


@dataclass(frozen=True)
class TimeStat(Record):
    """Seconds per call: median and inter-quartile range over ``repeats`` samples (each the mean
    of ``calls_per_sample`` calls), and the call's peak memory with its source: "cuda"
    (``max_memory_allocated``) or "rss" (the sampled RSS increase on the CPU).  ``extrapolated``:
    exact attention timed on ``extrapolated_rows`` query rows and scaled to all of them (too
    costly to time in full; docs/metrics.md).  ``min_time``: the seconds of timed calls the
    samples had to reach (``--min-time``)."""

    median: float | None
    iqr: float | None
    repeats: int = json_field(absent=0)
    peak_memory_bytes: int | None = None
    calls_per_sample: int = 1
    # before 0.4 only CUDA recorded a peak
    memory_source: str | None = json_field(None, migrate=lambda r: _legacy_source(r))
    extrapolated: bool = False
    extrapolated_rows: int | None = None
    min_time: float | None = None  # the seconds of timed calls asked for (--min-time)

    json_order = (
        "median",
        "iqr",
        "repeats",
        "calls_per_sample",
        "peak_memory_bytes",
        "memory_source",
        "extrapolated",
        "extrapolated_rows",
        "min_time",
    )

    @classmethod
    def of_samples(
        cls,
        samples: Sequence[float],
        *,
        calls_per_sample: int = 1,
        peak_memory_bytes: int | None = None,
        memory_source: str | None = None,
        min_time: float | None = None,
        extrapolated_rows: int | None = None,
    ) -> TimeStat:
        """The record of timed samples (seconds per call): their median and inter-quartile range
        (inclusive quartiles; 0 for one sample), as ``kdecli.measure.timing`` computes them."""
        if not samples:
            raise ValueError("a TimeStat needs at least one sample")
        iqr = 0.0
        if len(samples) > 1:
            q = statistics.quantiles(samples, n=4, method="inclusive")
            iqr = q[2] - q[0]
        return cls(
            statistics.median(samples),
            iqr,
            len(samples),
            peak_memory_bytes,
            calls_per_sample,
            memory_source,
            extrapolated_rows is not None,
            extrapolated_rows,
            min_time,
        )


def _legacy_source(reader: Reader) -> str | None:
    return None if reader.data.get("peak_memory_bytes") is None else "cuda"


@dataclass(frozen=True)
class Shape(Record):
    b: int
    h: int
    n_q: int
    n_k: int
    d: int
    d_v: int

    @property
    def slices(self) -> int:
        return self.b * self.h


@dataclass(frozen=True)
class InputInfo(Record):
    """The input as run: its name, shape, layout, stored dtype, the softmax scale used, its mask
    (``causal``, and a causal mask's first query position ``query_offset``, written when not 0)."""

    source: str
    shape: Shape
    layout: str = json_field(absent="bhnd")
    dtype: str = json_field(absent="?")
    scale: float = json_field()
    causal: bool = json_field(absent=False)
    query_offset: int = json_field(0, omit="falsy")
    # what was measured: every query ("prefill"), or the last ``queries`` queries of the input,
    # each over its own prefix ("decode"; ``shape.n_q`` is then those M); written for decode only
    phase: str = json_field("prefill", omit="default", choices=("prefill", "decode"))
    queries: int | None = json_field(None, omit="none")
    note: str | None = json_field(None, omit="none")  # e.g. decode on an input that is not causal

    def describe(self) -> str:
        """One line: the source, its shape and the scale (the scale changes which methods win);
        for decode, the queries measured."""
        s = self.shape
        return (
            f"{self.source}  b={s.b} h={s.h} n_q={s.n_q} n_k={s.n_k} d={s.d} d_v={s.d_v}  "
            f"scale={self.scale:.6g}"
            + ("  causal" if self.causal else "")
            + (f" (query offset {self.query_offset})" if self.query_offset else "")
            + (f"  decode: the last {self.queries} queries" if self.phase == "decode" else "")
        )


@dataclass(frozen=True)
class Floors(Record):
    """Errors of the two trivial answers: every query gets the mean of V; every output is zero."""

    mean: dict[str, Summary]
    zero: dict[str, Summary]

    def mean_floor(self, metric: str = "rel_spectral") -> float | None:
        summary = self.mean.get(metric)
        return None if summary is None else summary.mean


@dataclass(frozen=True)
class ReferenceInfo(Record):
    """The exact reference a run measured against: every query (``mode`` "full"), or ``rows``
    query rows drawn with ``seed`` (``mode`` "rows"; docs/metrics.md), whose errors are
    estimates with a ``level`` interval from ``draws`` bootstrap resamples of the rows.
    ``requested`` is what ``--reference`` asked for (``auto`` picks by the input's size).  The
    interval's method, draws and level are written as one ``interval`` object (null for none)."""

    mode: str = json_field("full", choices=("full", "rows"))
    rows: int | None = None
    seed: int | None = None
    requested: str = json_field("full", migrate=lambda r: r.str("mode", "full"))
    interval: str | None = json_field(None, name="interval.method")  # "bootstrap"
    draws: int | None = json_field(None, name="interval.draws")
    level: float | None = json_field(None, name="interval.level")

    @property
    def sampled(self) -> bool:
        return self.mode == "rows"

    @property
    def primary_metric(self) -> str:
        """The metric that ranks and meets the floor: rel_spectral, which needs every row, or
        rel_frobenius under a row sample."""
        return "rel_frobenius" if self.sampled else "rel_spectral"


@dataclass(frozen=True)
class ResultTime(Record):
    """The method's time and exact attention's, from the same run; ``note`` says why one is absent.

    With ``--backward`` also one forward + backward of each (``backward_s``, ``exact_backward_s``:
    the inputs require grad, the call is the method then ``autograd.grad`` of the output) and
    their ratio; ``backward_note`` says why the method's was not timed (its forward figures
    stand).  The four are written only when set, so older documents read as before.

    A decode step's record: ``method_s`` and ``exact_s`` are one step's (the method's on a
    prepared cache, exact attention's over the whole cache), ``prepare_s`` the cache's one-off
    preparation (absent when the method has none), and ``amortised_s`` = step + prepare/``steps``
    with its ``amortised_speedup``; also written only when set.
    """

    method_s: TimeStat | None
    exact_s: TimeStat | None
    speedup: float | None
    note: str | None = json_field(None, omit="none")
    backward_s: TimeStat | None = json_field(None, omit="none")
    exact_backward_s: TimeStat | None = json_field(None, omit="none")
    backward_speedup: float | None = json_field(None, omit="none")
    backward_note: str | None = json_field(None, omit="none")
    prepare_s: TimeStat | None = json_field(None, omit="none")
    steps: int | None = json_field(None, omit="none")
    amortised_s: float | None = json_field(None, omit="none")
    amortised_speedup: float | None = json_field(None, omit="none")

    @property
    def method_median(self) -> float | None:
        return None if self.method_s is None else self.method_s.median

    @property
    def exact_median(self) -> float | None:
        return None if self.exact_s is None else self.exact_s.median

    @property
    def backward_median(self) -> float | None:
        return None if self.backward_s is None else self.backward_s.median

    @property
    def exact_backward_median(self) -> float | None:
        return None if self.exact_backward_s is None else self.exact_backward_s.median


# The diagnostics' figures (``Diagnostics``), and those split by norm like the errors.
DIAGNOSTIC_FIGURES = ("density", "mass_recall", "selection_error", "estimation_error", "lse_error")
SPLIT_FIGURES = ("selection_error", "estimation_error")


@dataclass(frozen=True)
class Diagnostics(Record):
    """Why one call's estimate is wrong (``kdecli.measure.diagnostics``; docs/metrics.md): one
    ``Summary`` per figure over batch×head slices (``per_slice`` keeps every head).
    ``selection_error`` and ``estimation_error`` hold one ``Summary`` per norm (``rel_spectral``,
    ``rel_frobenius``).  A figure the method cannot give is null and ``note`` says why (no key
    set: the method's ``key_set_note``); under a row sample it says the figures are the rows'."""

    density: Summary | None = None
    mass_recall: Summary | None = None
    selection_error: dict[str, Summary] | None = None
    estimation_error: dict[str, Summary] | None = None
    lse_error: Summary | None = None
    note: str | None = json_field(None, omit="none")

    def figure(self, name: str, metric: str = "rel_spectral") -> Summary | None:
        """``name``'s Summary (one of ``DIAGNOSTIC_FIGURES``); a split's in ``metric``."""
        value = getattr(self, name)
        if name in SPLIT_FIGURES:
            return None if value is None else value.get(metric)
        return value
