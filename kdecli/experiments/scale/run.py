"""``kdecli scale``: time and error against the sequence length n, with the fitted exponents.

One ``compare`` per length on the same input (``synthetic:`` drawn at each n, or a file cropped to
its first n queries and keys), each with its own reference (``--reference auto`` turns to a row
sample past the full reference's reach) and its own timing of exact attention (extrapolated from a
row sample where a full call would take too long: the record says so).  For each method, and for
exact attention, the exponent α of time ≈ c·n^α is the least-squares slope of log t against log n:

    α = Σ (x_i − x̄)(y_i − ȳ) / Σ (x_i − x̄)²,   x = log n, y = log t

over the lengths where the method ran.  For exact attention only measured times enter the fit
when at least two lengths were measured: an extrapolated time is n_q/R times the time of R rows,
quadratic by construction, so fitting it would only return the assumption.

``phase="decode"``: each length is a cache of n keys, and each run is ``compare``'s decode phase,
the last M queries (``queries``, 1: one decode step) over the whole cache: the error is that of
those rows (their float64 reference is cheap even at 1M keys: one row's attention), the time is
one step against exact attention's step over the whole cache, with the method's preparation of
the cache timed apart and amortised over ``steps``.  What the inputs, their float64 copy and the
working copy of a cache would hold (``kdecli.measure.memory.decode_bytes``) is checked against
the device's free memory for every length before the first runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from kdecli.devices import available_memory, resolve_device, resolve_dtype
from kdecli.errors import UsageError
from kdecli.experiments.compare.records import Result, RunReport
from kdecli.experiments.compare.run import compare
from kdecli.experiments.scale.records import (  # noqa: F401 (re-exported; their home)
    SCALE_SCHEMA_VERSION,
    Fit,
    ScaleReport,
)
from kdecli.measure.config import RunConfig
from kdecli.measure.memory import decode_bytes
from kdecli.qkv import QKV
from kdecli.sources import InputOptions, load_input


def parse_lengths(spec: str | Sequence[int]) -> list[int]:
    """``"4096,16384,65536"`` (``k``/``M`` suffixes for 2^10 / 2^20 allowed: ``64k``, ``1M``) ->
    increasing distinct lengths."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    lengths = []
    for item in items:
        text = str(item).strip()
        match = re.fullmatch(r"(\d+)\s*([kKmM]?)", text)
        if not match:
            raise UsageError(
                f"--n must be comma-separated positive integers (64k and 1M allowed); got {text!r}."
            )
        n = int(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[match.group(2).lower()]
        if n < 2:
            raise UsageError(f"--n: every length must be at least 2; got {n}.")
        lengths.append(n)
    if len(set(lengths)) != len(lengths):
        raise UsageError(f"--n: a length is repeated in {spec!r}.")
    if len(lengths) < 2:
        raise UsageError("--n needs at least two lengths to fit an exponent.")
    return sorted(lengths)


def input_at(spec: str, n: int, options: InputOptions | None = None) -> Any:
    """The input at length n: a ``synthetic:`` spec drawn with n (and nq) set, anything else
    loaded and cropped to its first n queries and keys (an error when it is shorter)."""
    options = options or InputOptions()
    if spec.startswith("synthetic:"):
        items = [p for p in spec[len("synthetic:") :].split(",") if p.strip()]
        kept = [p for p in items if p.split("=")[0].strip() not in ("n", "nq")]
        return load_input("synthetic:" + ",".join([*kept, f"n={n}"]), replace(options, n=None))
    return load_input(spec, replace(options, n=n))


def fit_exponent(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares slope of log t against log n (module docstring); None below two points."""
    pts = [(math.log(n), math.log(t)) for n, t in points if t and t > 0 and math.isfinite(t)]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def _fit(points: Sequence[tuple[int, float]], note: str | None = None) -> Fit:
    ns = [n for n, _ in points]
    return Fit(
        fit_exponent(points), len(points), min(ns, default=None), max(ns, default=None), note
    )


def fits_of(report: ScaleReport) -> dict[str, Fit]:
    """Each method's fit, and exact attention's (measured lengths only, when two or more)."""
    methods: list[str] = []
    for run in report.runs:
        methods += [r.method for r in run.results if r.method not in methods]
    fits = {}
    for method in methods:
        timed = [(n, r.time.method_s.median) for n, r in report.points(method) if _timed(r)]
        fits[method] = _fit(timed)
    exact: list[tuple[int, float, bool]] = []
    for n, run in zip(report.lengths, report.runs):
        timed = [r for r in run.results if r.time is not None and r.time.exact_s is not None]
        if timed and timed[0].time.exact_s.median:
            exact.append((n, timed[0].time.exact_s.median, exact_extrapolated(timed[0])))
    measured = [(n, t) for n, t, extrapolated in exact if not extrapolated]
    if len(measured) >= 2:
        note = None if len(measured) == len(exact) else "measured lengths only"
        fits["exact"] = _fit(measured, note)
    else:
        fits["exact"] = _fit([(n, t) for n, t, _ in exact], "includes extrapolated times")
    return fits


def _timed(record: Result) -> bool:
    return record.time is not None and record.time.method_s is not None


def exact_extrapolated(record: Result) -> bool:
    """Whether the record's exact time was extrapolated from a row sample (issue 12, point 2)."""
    exact = record.time.exact_s if record.time is not None else None
    return bool(
        getattr(exact, "extrapolated", False) or getattr(record.time, "extrapolated", False)
    )


def check_decode_memory(qkv: QKV, lengths: Sequence[int], config: RunConfig) -> None:
    """A ``UsageError`` naming the first length whose decode cache would not fit on the device
    (``qkv``: the input at any length, for its b, h, d, d_v and dtype); nothing when the free
    memory cannot be told."""
    device = config.device
    device = device if isinstance(device, torch.device) else resolve_device(device)
    free = available_memory(device)
    if free is None:
        return
    dtype = config.dtype
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype) or qkv.k.dtype
    shape = qkv.shape
    work = torch.empty((), dtype=dtype).element_size()
    for n in lengths:
        needed = decode_bytes(shape["b"], shape["h"], n, shape["d"], shape["d_v"],
                              config.queries, qkv.k.element_size(), work)  # fmt: skip
        if needed > free:
            raise UsageError(
                f"--n {n:,}: a decode cache of {n:,} keys (b·h = {shape['b'] * shape['h']}, "
                f"d = {shape['d']}, d_v = {shape['d_v']}) needs about {needed / 2**30:.1f} GiB "
                f"with its float64 and working copies; {device.type} has {free / 2**30:.1f} GiB "
                "available. Use smaller --n, or fewer slices."
            )


def scale(
    spec: str,
    methods: Sequence[str],
    budget: int | None,
    lengths: Sequence[int],
    config: RunConfig | None = None,
    *,
    options: InputOptions | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    on_run: Callable[[int, RunReport], None] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    **settings: Any,
) -> ScaleReport:
    """``compare`` of ``methods`` at ``budget`` on ``spec`` at every length, then the fits;
    under ``config.phase`` "decode" a length is a cache length (module docstring).

    ``on_run(n, report)`` is called as each length finishes; ``should_stop()`` ends the sweep
    between lengths (and inside one, as ``compare`` does), keeping what finished."""
    config = config or RunConfig()  # checked as it is made
    if settings:
        config = replace(config, **settings)
    decode = config.phase == "decode"
    if config.phase == "both":
        raise UsageError("scale measures one phase: --phase prefill or --phase decode.")
    if decode and lengths and config.queries > min(lengths):
        raise UsageError(
            f"--queries {config.queries} is more than the shortest cache, --n {min(lengths)}."
        )
    budgets = [budget] if budget is not None else []
    report = ScaleReport(
        input=spec,
        budget=budget,
        lengths=[],
        phase=config.phase,
        queries=config.queries if decode else None,
        steps=config.steps if decode else None,
    )
    first = input_at(spec, lengths[0], options) if lengths else None
    if decode and first is not None:
        check_decode_memory(first, lengths, config)
    for index, n in enumerate(lengths):
        if should_stop and should_stop():
            report.interrupted = True
            break
        if on_progress:
            on_progress(index, len(lengths), f"n = {n}")
        qkv = first if index == 0 else input_at(spec, n, options)
        first = None  # held only until the first length runs
        run = compare(qkv, methods, budgets, config, params=params, should_stop=should_stop)
        report.lengths.append(n)
        report.runs.append(run)
        report.environment = report.environment or run.environment
        if on_run:
            on_run(n, run)
        if run.interrupted:
            report.interrupted = True
            break
    if on_progress:
        on_progress(len(report.lengths), len(lengths), "done")
    report.fits = fits_of(report)
    return report
