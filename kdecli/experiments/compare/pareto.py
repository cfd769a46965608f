"""The cheapest setting of each method that reaches a target error (``compare --target-error E``).

For every method, among its settings (method × budget × parameters) whose seeds all ran (status
``ok``), keep those whose seed-mean error (the mean over seeds of each record's slice-mean, as in
the table) is at most E, and pick the one with the fewest FLOPs (the method's cost model), ties
broken by the measured median time.  A setting without a FLOPs figure ranks after every setting with
one; a method that never reaches E gets ``None``.  This is one point of the error-vs-cost Pareto
front per method: the answer to "what does it cost to be this accurate with method X?".
The metric is rel_spectral by default, or rel_frobenius for records measured on a row-sampled
reference (which cannot give rel_spectral): its estimate, not its interval's bound, is compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from kdecli.errors import UsageError
from kdecli.experiments.compare.aggregate import Setting, aggregate, primary_metric
from kdecli.experiments.compare.records import Pareto, ParetoPick, Result
from kdecli.measure.metrics import METRICS


def check_target_error(target_error: float, metric: str = "rel_spectral") -> float:
    """A target error must be a positive finite number; the metric one of METRICS."""
    if metric not in METRICS:
        raise UsageError(f"the target metric must be one of {', '.join(METRICS)}; got {metric!r}.")
    if (
        isinstance(target_error, bool)
        or not isinstance(target_error, (int, float))
        or not math.isfinite(target_error)
        or target_error <= 0
    ):
        raise UsageError(f"--target-error must be a positive number; got {target_error!r}.")
    return float(target_error)


def cheapest_settings(
    results: Iterable[Result], target_error: float, metric: str | None = None
) -> Pareto:
    """Each method's cheapest setting with seed-mean ``metric`` ≤ ``target_error`` (or None).

    Every method in ``results`` appears, in the order of first appearance.  ``metric`` None:
    ``aggregate.primary_metric`` (rel_spectral, or rel_frobenius under a row sample).
    """
    results = list(results)
    metric = primary_metric(results) if metric is None else metric
    return cheapest_of(aggregate(results, metric=metric), target_error, metric)


def cheapest_of(settings: Iterable[Setting], target_error: float, metric: str) -> Pareto:
    """``cheapest_settings`` among ``settings`` as they are, each judged by its ``error(metric)``
    (``kdecli.experiments.compare.heads`` gives a setting its worst head's figure instead)."""
    target = check_target_error(target_error, metric)
    best: dict[str, tuple[tuple[float, float], ParetoPick] | None] = {}
    for setting in settings:
        best.setdefault(setting.method, None)
        error = setting.error(metric)
        if setting.status != "ok" or error is None or not error <= target:
            continue
        time = setting.time
        flops, seconds = setting.flops, None if time is None else time.method_median
        key = (math.inf if flops is None else flops, math.inf if seconds is None else seconds)
        current = best[setting.method]
        if current is None or key < current[0]:
            pick = ParetoPick(setting.budget, setting.params, flops, error, seconds)
            best[setting.method] = (key, pick)
    return Pareto(
        target, metric, {name: None if pick is None else pick[1] for name, pick in best.items()}
    )
