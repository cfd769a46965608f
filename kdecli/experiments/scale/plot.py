"""``kdecli plot SCALE.json`` (a ``kdecli scale`` document): time and error against n, log axes.

Left: seconds per call against n for each method and for exact attention, on log-log axes, so a
slope is the exponent of the fit (given in the legend); exact times extrapolated from a row sample
are drawn hollow.  Right: the error each method reached at each length (rel_spectral with the full
reference, rel_frobenius with its 95 % interval under a row sample).  A ``--target-error``
document draws each method's smallest density meeting the target against n instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdecli.errors import UsageError
from kdecli.experiments.scale.records import ScaleReport
from kdecli.experiments.scale.report import ScaleRow, rows
from kdecli.render.figures import check_plot_path, method_colours, new_figure, save_figure


def _slope(report: ScaleReport, name: str) -> str:
    fit = report.fits.get(name)
    return "" if fit is None or fit.exponent is None else f" (n^{fit.exponent:.2f})"


def _error_bars(points: list[ScaleRow]) -> tuple[list[float], list[float]]:
    """How far each point's 95 % interval reaches below and above it (0 without one)."""
    low = [p.error - (p.error if p.error_low is None else p.error_low) for p in points]
    high = [(p.error if p.error_high is None else p.error_high) - p.error for p in points]
    return low, high


def tolerable_figure(report: ScaleReport):
    """A ``--target-error`` document: each method's smallest budget meeting E against n, as a
    density (budget / n) on log-log axes; hollow where the grid's smallest budget meets E (the
    density may be lower), no point where none meets it."""
    record = report.tolerable
    if not report.lengths:
        raise UsageError("nothing to plot: the scale document holds no finished length.")
    fig = new_figure(7, 4.5)
    ax = fig.subplots()
    for method, colour in method_colours(record.methods).items():
        met = [a for n in report.lengths if (a := record.answer(method, n)) and a.budget]
        ax.plot([a.n for a in met], [a.density for a in met], "o-", color=colour, label=method,
                gid="method")  # fmt: skip
        hollow = [a for a in met if a.below_grid]
        if hollow:
            ax.plot([a.n for a in hollow], [a.density for a in hollow], "o", color=colour,
                    mfc="white")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="n", ylabel="smallest density meeting E (budget / n)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    heads = ", every head" if record.criterion != "mean" else ""
    fig.suptitle(f"{report.input}: {record.metric} ≤ {record.target_error:g}{heads}")
    return fig


def figure(report: ScaleReport):
    """A matplotlib Figure: time against n (log-log, with exact attention) and error against n;
    for a ``--target-error`` document, ``tolerable_figure``."""
    if report.tolerable is not None:
        return tolerable_figure(report)
    table = rows(report)
    if not table:
        raise UsageError("nothing to plot: the scale document holds no finished length.")
    fig = new_figure(12, 4.5)
    ax_time, ax_err = fig.subplots(1, 2)
    colours = method_colours(row.method for row in table)
    for method, colour in colours.items():
        timed = [r for r in table if r.method == method and r.time_s]
        ax_time.plot([r.n for r in timed], [r.time_s for r in timed], "o-", color=colour,
                     label=method + _slope(report, method), gid="method")  # fmt: skip
        errs = [r for r in table if r.method == method and r.error is not None]
        ax_err.errorbar(
            [r.n for r in errs], [r.error for r in errs], yerr=_error_bars(errs), fmt="o-",
            capsize=3, label=method, color=colour, gid="method",
        )  # fmt: skip
    exact: dict[int, tuple[float, bool]] = {}
    for r in table:
        if r.exact_s and r.n not in exact:
            exact[r.n] = (r.exact_s, bool(r.exact_extrapolated))
    if exact:
        ns = sorted(exact)
        ax_time.plot(ns, [exact[n][0] for n in ns], "k--", gid="reference",
                     label="exact (SDPA)" + _slope(report, "exact"))  # fmt: skip
        hollow = [n for n in ns if exact[n][1]]
        if hollow:
            ax_time.plot(hollow, [exact[n][0] for n in hollow], "ko", mfc="none",
                         label="extrapolated")  # fmt: skip
    x_label = "n (cache length)" if report.phase == "decode" else "n (queries = keys)"
    y_label = "seconds per decode step" if report.phase == "decode" else "seconds per call"
    ax_time.set(xscale="log", yscale="log", xlabel=x_label, ylabel=y_label)
    ax_err.set(xscale="log", xlabel=x_label, ylabel="error (rel_spectral, or F rows)")
    for ax in (ax_time, ax_err):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    budget = "" if report.budget is None else f", budget {report.budget}"
    fig.suptitle(f"{report.input}{budget}")
    return fig


def plot_scale(report: ScaleReport, path: str | os.PathLike) -> Path:
    """Draw ``report`` to ``path`` (.png, .svg or .pdf) and return the path."""
    check_plot_path(path)
    return save_figure(figure(report), path)
