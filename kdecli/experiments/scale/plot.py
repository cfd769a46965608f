"""``kdecli plot SCALE.json`` (a ``kdecli scale`` document): time and error against n, log axes.

Left: seconds per call against n for each method and for exact attention, on log-log axes, so a
slope is the exponent of the fit (given in the legend); exact times extrapolated from a row sample
are drawn hollow.  Right: the error each method reached at each length (rel_spectral with the full
reference, rel_frobenius with its 95 % interval under a row sample).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdecli.errors import UsageError
from kdecli.experiments.compare.plot import check_plot_path
from kdecli.experiments.scale.report import rows
from kdecli.experiments.scale.run import ScaleReport
from kdecli.files import atomic_path, write_failure


def is_scale_document(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``kdecli scale`` JSON document (read cheaply: the first bytes)."""
    try:
        with open(path, encoding="utf-8") as file:
            head = file.read(4096)
    except OSError:
        return False
    return '"document": "scale"' in head


def load_scale(path: str | os.PathLike) -> ScaleReport:
    try:
        with open(path, encoding="utf-8") as file:
            data: Any = json.load(file)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read a scale document ({exc}).") from None
    return ScaleReport.from_dict(data)


def plot_scale(report: ScaleReport, path: str | os.PathLike) -> Path:
    path = check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(report)
    methods = list(dict.fromkeys(row["method"] for row in table))
    fig, (ax_time, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in methods:
        mine = [r for r in table if r["method"] == method and r["time_s"]]
        fit = report.fits.get(method)
        slope = "" if fit is None or fit.exponent is None else f" (n^{fit.exponent:.2f})"
        line = ax_time.plot([r["n"] for r in mine], [r["time_s"] for r in mine], "o-")[0]
        line.set_label(method + slope)
        errs = [r for r in table if r["method"] == method and r["error"] is not None]
        low = [
            r["error"] - (r["error_low"] if r["error_low"] is not None else r["error"])
            for r in errs
        ]
        high = [
            (r["error_high"] if r["error_high"] is not None else r["error"]) - r["error"]
            for r in errs
        ]
        ax_err.errorbar(
            [r["n"] for r in errs], [r["error"] for r in errs], yerr=[low, high], fmt="o-",
            capsize=3, label=method, color=line.get_color(),
        )  # fmt: skip
    exact = {}
    for r in table:
        if r["exact_s"] and r["n"] not in exact:
            exact[r["n"]] = (r["exact_s"], r["exact_extrapolated"])
    if exact:
        ns = sorted(exact)
        fit = report.fits.get("exact")
        slope = "" if fit is None or fit.exponent is None else f" (n^{fit.exponent:.2f})"
        ax_time.plot(ns, [exact[n][0] for n in ns], "k--", label="exact (SDPA)" + slope)
        hollow = [n for n in ns if exact[n][1]]
        ax_time.plot(hollow, [exact[n][0] for n in hollow], "ko", mfc="none", label="extrapolated")
    ax_time.set(xscale="log", yscale="log", xlabel="n (queries = keys)", ylabel="seconds per call")
    ax_err.set(xscale="log", xlabel="n (queries = keys)", ylabel="error (rel_spectral, or F rows)")
    for ax in (ax_time, ax_err):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    budget = "" if report.budget is None else f", budget {report.budget}"
    fig.suptitle(f"{report.input}{budget}")
    try:
        with atomic_path(path) as partial:
            fig.savefig(partial, dpi=150, bbox_inches="tight", format=path.suffix[1:].lower())
    except OSError as exc:
        raise write_failure(str(path), exc) from None
    finally:
        plt.close(fig)
    return path
