"""The cheapest setting of each method that reaches a target error (``compare --target-error E``).

For every method, among its method × budget settings whose seeds all ran (status ``ok``), keep those
whose seed-mean error (the mean over seeds of each record's slice-mean, as in the table) is at most
E, and pick the one with the fewest FLOPs (the method's cost model), ties broken by the measured
median time.  A setting without a FLOPs figure ranks after every setting with one; a method that
never reaches E gets ``None``.  This is one point of the error-vs-cost Pareto front per method:
the answer to "what does it cost to be this accurate with method X?".
"""

from __future__ import annotations

import math
from typing import Any

from kdecli.errors import UsageError
from kdecli.metrics import METRICS
from kdecli.report import aggregate


def check_target_error(target_error: float, metric: str = "rel_spectral") -> float:
    """A target error must be a positive finite number; the metric one of METRICS."""
    if metric not in METRICS:
        raise UsageError(f"the target metric must be one of {', '.join(METRICS)}; got {metric!r}.")
    if isinstance(target_error, bool) or not isinstance(target_error, (int, float)) or \
            not math.isfinite(target_error) or target_error <= 0:
        raise UsageError(f"--target-error must be a positive number; got {target_error!r}.")
    return float(target_error)


def _median_time(row: dict[str, Any]) -> float | None:
    return ((row.get("time") or {}).get("method_s") or {}).get("median")


def cheapest_settings(
    results: list[dict[str, Any]], target_error: float, metric: str = "rel_spectral",
) -> dict[str, Any]:
    """{"target_error", "metric", "methods": {name: {budget, params, flops, <metric>, method_s} | None}}.

    ``results`` are the records of a run (``RunReport.results``); every method in them appears in
    ``methods``, in the order of first appearance.
    """
    target = check_target_error(target_error, metric)
    best: dict[str, tuple[tuple[float, float], dict[str, Any]] | None] = {}
    for row in aggregate(results):
        best.setdefault(row["method"], None)
        error = row["errors"].get(metric, {}).get("mean")
        if row["status"] != "ok" or error is None or not error <= target:
            continue
        flops, seconds = row.get("flops"), _median_time(row)
        key = (math.inf if flops is None else flops, math.inf if seconds is None else seconds)
        current = best[row["method"]]
        if current is None or key < current[0]:
            entry = {"budget": row["budget"], "params": row["params"], "flops": flops,
                     metric: error, "method_s": seconds}
            best[row["method"]] = (key, entry)
    return {
        "target_error": target, "metric": metric,
        "methods": {name: (None if pick is None else pick[1]) for name, pick in best.items()},
    }
