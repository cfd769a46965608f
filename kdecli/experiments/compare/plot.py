"""Figures of ``kdecli compare`` results: error against budget, time or FLOPs, one line per method.

What a figure shows, and the choices made:
- One line per method (per results file when several are given: lines of the second file are
  dashed, of the third dotted, and the legend names each file's device and dtype, so one method on
  two devices can be compared).  A point is the mean over seeds of each record's slice-mean error;
  the band around it spans the min–max over seeds (drawn where a setting has several seeds).
- Points of a method are joined in budget order on every x axis (a time or FLOPs curve follows the
  budget, even when timing noise makes it step back).
- The x axis is logarithmic (budgets are usually powers of two); the y axis is logarithmic when the
  values span more than one decade.
- Floors: the ``mean`` baseline (every query gets the mean of V) as a dashed horizontal line, and
  the zero output (1 on the relative norms) as a dotted one when the curves come near it.
- The reference method (role ``reference``: ``exact``, whose error is rounding, ~1e-7) is not
  drawn as a method.  Its median time (the run's SDPA timing) is a vertical line on time plots,
  and its cost model a vertical line on FLOPs plots.  A baseline (role ``baseline``: ``mean``) is
  the mean floor on budget plots and a single point on time and FLOPs plots; any other
  budget-free method is a horizontal line on budget plots and a point elsewhere.
- Records whose status is not ``ok`` are left out, and the caption says so.
- ``--x layer`` draws error against layer; ``--x head`` each head's error, or a layer × head heat
  map for runs over layers (``kdecli.experiments.compare.head_plot``).

Matplotlib draws headless (the Agg canvas; no display needed): ``pip install 'kdecli[plot]'``.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdecli.errors import UsageError
from kdecli.experiments.compare.aggregate import group_settings
from kdecli.experiments.compare.records import Result, RunReport, load_document
from kdecli.measure.figures import Environment, InputInfo
from kdecli.measure.metrics import METRICS
from kdecli.render.cells import fmt_time
from kdecli.render.figures import (
    FLOOR,
    ZERO,
    caption,
    check_plot_path,
    log_if_spread,
    method_colours,
    new_figure,
    require_matplotlib,
    save_figure,
    shared_legend,
)

X_AXES = {
    "budget": "budget (keys or features per query; ▲ n keys: read more than the budget)",
    "time": "time per call (s, median)",
    "flops": "FLOPs per call (cost model)",
    "layer": "layer of the model",
    "head": "head (layer × head for runs over layers)",
}
Y_LABELS = {
    "rel_spectral": "rel_spectral  ‖Õ−O‖₂ / ‖O‖₂",
    "rel_frobenius": "rel_frobenius  ‖Õ−O‖_F / ‖O‖_F",
    "max_row_rel": "max_row_rel  maxᵢ ‖Õᵢ−Oᵢ‖ / ‖Oᵢ‖",
    "bound_normalized": "bound_normalized  ‖Õ−O‖₂ / (‖D⁻¹A‖₂‖V‖₂)",
}
DOC_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
BAND = "min–max over seeds"

# ---- reading results ---------------------------------------------------------------------------


def load_results(path: str | os.PathLike) -> RunReport:
    """Read a results file (JSON document or JSONL stream); refusals name the file and problem."""
    return load_document(path)


def _as_report(doc: RunReport | dict[str, Any], where: str) -> RunReport:
    return doc if isinstance(doc, RunReport) else RunReport.from_dict(doc, where)


# ---- from records to series --------------------------------------------------------------------


@dataclass
class Point:
    budget: int | None
    x: float | None
    ys: list[float]  # one slice-mean per seed
    # under a row-sampled reference: each seed's 95 % interval of its slice-mean
    intervals: list[tuple[float, float]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.ys) / len(self.ys)

    @property
    def interval(self) -> tuple[float, float] | None:
        """The seed-mean's interval: the mean of the seeds' bounds (as in the table)."""
        if not self.intervals:
            return None
        lows, highs = zip(*self.intervals)
        return sum(lows) / len(lows), sum(highs) / len(highs)


@dataclass
class Series:
    method: str
    role: str
    points: list[Point] = field(default_factory=list)
    phase: str = "prefill"  # a document over both phases has a series per method × phase

    @property
    def budget_free(self) -> bool:
        return all(p.budget is None for p in self.points)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _x_value(record: Result, x: str) -> float | None:
    if x == "budget":
        return record.budget
    if x == "time":
        return None if record.time is None else record.time.method_median
    return record.flops


def _over_budget(doc: RunReport, s: Series) -> dict[int, float]:
    """{budget: keys per query} of the series' settings that read more keys than their budget
    (reformer at budget 64 reads 512): drawn at the budget, they are marked with what they read."""
    return {
        r.budget: r.keys_per_query
        for r in doc.results
        if r.ok and r.method == s.method and r.phase == s.phase and r.budget
        and r.keys_per_query is not None and r.keys_per_query > r.budget
    }  # fmt: skip


def collect_series(doc: RunReport, x: str, y: str) -> tuple[list[Series], list[str]]:
    """One Series per method × phase (ok records only) and notes on what was left out."""
    by_method: dict[tuple[str, str], list[tuple[Result, ...]]] = defaultdict(list)
    failed: dict[str, set[str]] = defaultdict(set)
    for records in group_settings(r for r in doc.results if r.ok):
        by_method[records[0].method, records[0].phase].append(records)
    for record in doc.results:
        if not record.ok:
            failed[record.method].add(record.status)
    series, notes, no_x = [], [], []
    for (method, phase), settings in by_method.items():
        s = Series(method, settings[0][0].role, phase=phase)
        for records in settings:
            budget = records[0].budget
            ys = [r.error(y) for r in records if _finite(r.error(y))]
            xv = next((v for v in (_x_value(r, x) for r in records) if _finite(v) and v > 0), None)
            if not ys:
                continue
            if xv is None and not (x == "budget" and budget is None):
                no_x.append(method)
                continue
            intervals = [
                (i.low, i.high)
                for i in (r.errors[y].interval for r in records if y in r.errors)
                if i is not None and _finite(i.low) and _finite(i.high)
            ]
            s.points.append(Point(budget, None if xv is None else float(xv), ys, intervals))
        s.points.sort(key=lambda p: (p.budget is None, p.budget or 0, p.x or 0))
        if s.points:
            series.append(s)
    for method, statuses in failed.items():
        if method not in {name for name, _ in by_method}:
            notes.append(f"{method} ({'/'.join(sorted(statuses))})")
    if no_x:
        notes.append(f"{', '.join(sorted(set(no_x)))} (no {x})")
    return series, notes


# ---- drawing ------------------------------------------------------------------------------------


def _doc_labels(docs: Sequence[RunReport], names: Sequence[str] | None) -> list[str]:
    """Tell documents apart by device and dtype; then by file name or input source; then number."""

    def device(env: Environment) -> str:
        return env.device if env.device == "cpu" else env.device_name or env.device

    labels = [f"{device(d.environment)} {d.environment.dtype}" for d in docs]
    if len(set(labels)) < len(labels):
        extra = list(names) if names else [d.input.source for d in docs]
        labels = [f"{label} · {more}" for label, more in zip(labels, extra)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def _distinct(values: Sequence[str]) -> str:
    return " vs ".join(dict.fromkeys(values))


def _title(docs: Sequence[RunReport], y: str, xs: Sequence[str]) -> str:
    def shape(inp: InputInfo) -> str:
        return " ".join(f"{k}={v}" for k, v in inp.shape.to_dict().items())

    inputs = [d.input for d in docs]
    causal = any(i.causal for i in inputs)
    return "\n".join(
        [
            f"{y} vs {' and '.join(xs)} · {_distinct([i.source for i in inputs])}",
            f"{_distinct([shape(i) for i in inputs])} · scale "
            f"{_distinct([format(i.scale, '.4g') for i in inputs])}"
            + (" · causal" if causal else "")
            + f" · {_distinct([d.environment.label() for d in docs])}",
        ]
    )


def _exact_time(doc: RunReport) -> float | None:
    return next((r.time.exact_median for r in doc.results if r.time and r.time.exact_median), None)


def _exact_flops(doc: RunReport) -> float | None:
    """The reference's cost: its record's, else its cost model at the input's shape."""
    for record in doc.results:
        if record.role == "reference" and record.flops is not None:
            return record.flops
    from kdecli.methods import method_of_role

    flops = method_of_role("reference")().flops(*doc.input.shape.to_dict().values())
    return flops if math.isfinite(flops) else None


def _floor(doc: RunReport, which: str, y: str, phase: str | None = None) -> float | None:
    """A floor of the document (its first part's), or of ``phase`` in a run over both phases."""
    if which == "zero" and y != "bound_normalized":
        return 1.0
    floors = doc.floors if phase is None else doc.floors_of(None, phase)
    summary = getattr(floors, which).get(y)
    return None if summary is None else summary.mean


def _phase_dash(phase: str, dash: str, phased: bool) -> str:
    """A document's line style; its decode series dotted where it has both phases."""
    return ":" if phased and phase == "decode" else dash


def figure(
    docs: Sequence[RunReport | dict[str, Any]],
    x: str | Sequence[str] = "budget",
    y: str = "rel_spectral",
    *,
    names: Sequence[str] | None = None,
):
    """A matplotlib Figure with one panel per x axis (``"budget"``, ``"time"``, ``"flops"``, or
    several, comma-separated).  Artists carry a gid: ``"method"`` for the methods' lines and
    points, ``"band"`` for the seed bands, ``"floor"`` and ``"reference"`` for the other lines.
    ``names`` (one per document, e.g. file names) tell documents on the same device apart."""
    require_matplotlib()
    from matplotlib.ticker import FixedLocator, NullLocator

    xs = [part.strip() for part in x.split(",")] if isinstance(x, str) else list(x)
    for axis in xs:
        if axis not in X_AXES:
            raise UsageError(
                f"--x must be one of {', '.join(X_AXES)} (or several, comma-separated); "
                f"got {axis!r}."
            )
    if y not in METRICS:
        raise UsageError(f"--y must be one of {', '.join(METRICS)}; got {y!r}.")
    if not docs:
        raise UsageError("no results to plot.")
    docs = [
        _as_report(doc, names[i] if names else f"document {i + 1}") for i, doc in enumerate(docs)
    ]
    fallback = None
    if y == "rel_spectral" and all(d.reference.sampled for d in docs):
        y = "rel_frobenius"  # rel_spectral needs every row; a row sample estimates rel_frobenius
        fallback = (
            "These results used a row-sampled reference, which cannot give rel_spectral: "
            "rel_frobenius is drawn instead."
        )
    if not any(y in r.errors for d in docs for r in d.results):
        hint = (
            "Run `kdecli compare` with --bound to measure it." if y == "bound_normalized" else None
        )
        raise UsageError(f"no result holds {y}; nothing to plot.", hint=hint)

    labels = _doc_labels(docs, names)
    if "head" in xs:  # each head's figure: kdecli.experiments.compare.head_plot
        if xs != ["head"]:
            raise UsageError("--x head draws a panel of its own; give it alone.")
        from kdecli.experiments.compare.head_plot import head_figure

        return head_figure(docs, y, labels)
    if "layer" in xs:
        if xs != ["layer"]:
            raise UsageError("--x layer draws a panel of its own; give it alone.")
        return _layer_figure(docs, y, labels)
    several = len(docs) > 1
    drawn = [r.method for d in docs for r in d.results if r.role != "reference"]
    colors = method_colours(drawn)
    fig = new_figure(6.4 * len(xs) + 2.6, 5.2)
    axes = fig.subplots(1, len(xs), sharey=True, squeeze=False)[0]
    left_out: list[str] = []
    seeds_seen = 1
    sampled = False  # some point has a row sample's interval
    for ax, axis in zip(axes, xs):
        values: list[float] = []
        budgets: set[int] = set()
        for doc, label, (dash, marker) in zip(docs, labels, DOC_STYLES * len(docs)):
            series, notes = collect_series(doc, axis, y)
            left_out += [f"{n}{f' in {label}' if several else ''}" for n in notes]
            for s in series:
                if s.role == "reference" or (
                    s.role == "baseline" and axis == "budget" and s.budget_free
                ):
                    continue  # the reference, and the mean floor drawn below
                name = s.method + (" (oracle)" if s.role == "oracle" else "")
                phased = len(doc.phases) > 1  # two phases: decode dotted, named
                name += f" · {s.phase}" if phased else ""
                name += f" · {label}" if several else ""
                color = colors[s.method]
                seeds_seen = max(seeds_seen, *(len(p.ys) for p in s.points))
                values += [v for p in s.points for v in p.ys]
                if s.budget_free and axis == "budget":
                    ax.axhline(
                        s.points[0].mean,
                        color=color,
                        linestyle="-.",
                        label=f"{name} (no budget)",
                        gid="method",
                    )
                    continue
                px = [p.x for p in s.points]
                over = _over_budget(doc, s) if axis == "budget" else {}
                ax.plot(
                    px,
                    [p.mean for p in s.points],
                    linestyle="none" if s.budget_free else _phase_dash(s.phase, dash, phased),
                    marker=marker,
                    color=color,
                    label=name,
                    gid="method",
                )
                if any(len(p.ys) > 1 for p in s.points):
                    low, high = [min(p.ys) for p in s.points], [max(p.ys) for p in s.points]
                    if all(a <= b for a, b in zip(px, px[1:])):
                        ax.fill_between(
                            px, low, high, color=color, alpha=0.18, linewidth=0, gid="band"
                        )
                    else:  # x steps back (timing noise): a band would fold over itself; use bars
                        ax.vlines(px, low, high, color=color, alpha=0.35, linewidth=4, gid="band")
                for p in s.points:
                    if p.budget in over:  # the keys it really reads, beside the point
                        ax.annotate(f"▲ {over[p.budget]:g} keys", (p.x, p.mean), fontsize="x-small",
                                    color=color, xytext=(3, 3), textcoords="offset points")  # fmt: skip
                bounded = [p for p in s.points if p.interval is not None]
                if bounded:  # a row sample's 95 % intervals, as error bars
                    intervals = [p.interval for p in bounded]
                    ax.vlines([p.x for p in bounded], *zip(*intervals), color=color,
                              linewidth=1.2, gid="interval")  # fmt: skip
                    sampled = True
                budgets.update(p.budget for p in s.points if p.budget is not None)
        if not values:
            continue
        floors = {}
        for doc, label in zip(docs, labels):
            for phase in doc.phases if len(doc.phases) > 1 else [None]:
                value = _floor(doc, "mean", y, phase)
                where = label if phase is None else f"{phase} · {label}" if several else phase
                if value is not None:
                    floors.setdefault(round(value, 6), (value, where))
        for value, label in floors.values():
            where = f" · {label}" if len(floors) > 1 else ""
            ax.axhline(value, label=f"mean-of-V floor {value:.3g}{where}", **FLOOR)
        log_if_spread(ax, values + [v for v, _ in floors.values()])
        zero = _floor(docs[0], "zero", y)
        if zero is not None and zero <= 2 * max(values):
            ax.axhline(zero, label=f"zero output {zero:.3g}", **ZERO)
        for doc, label, (dash, _) in zip(docs, labels, DOC_STYLES * len(docs)):
            ref = (
                _exact_time(doc)
                if axis == "time"
                else _exact_flops(doc)
                if axis == "flops"
                else None
            )
            if ref is not None:
                text = fmt_time(ref) if axis == "time" else f"{ref:.3g} FLOPs"
                ax.axvline(
                    ref,
                    color="black",
                    linestyle=dash,
                    linewidth=1,
                    gid="reference",
                    label=f"exact attention {text}" + (f" · {label}" if several else ""),
                )
        if axis == "budget":
            ax.set_xscale("log", base=2)
            if budgets and len(budgets) <= 12:
                ax.xaxis.set_major_locator(FixedLocator(sorted(budgets)))
                ax.set_xticklabels([str(b) for b in sorted(budgets)])
                ax.xaxis.set_minor_locator(NullLocator())
        else:
            ax.set_xscale("log")
        ax.set_xlabel(X_AXES[axis])
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(Y_LABELS[y] + "\nmean over slices")
    if not any(a.get_lines() for a in axes):
        why = f" (not shown: {'; '.join(dict.fromkeys(left_out))})" if left_out else ""
        hints = []
        if "time" in xs:
            hints.append("Results of `compare --no-timing` have no times; use --x budget or flops.")
        if "budget" in xs:
            hints.append("exact and mean have no budget: --x time or flops shows mean.")
        hint = " ".join(hints) or None
        raise UsageError(
            f"nothing to plot: no result with status ok has {y} and {' / '.join(xs)}{why}.",
            hint=hint,
        )
    fig.suptitle(_title(docs, y, xs), fontsize="medium", x=0.01, ha="left")
    shared_legend(fig, axes)
    text = (
        f"Points: mean over seeds of each record's slice-mean {y}; bands (bars where x steps "
        f"back): {BAND} "
        f"(up to {seeds_seen} seed{'s' if seeds_seen > 1 else ''}). exact is the reference "
        "(error ≈ rounding): not drawn as a method."
    )
    if "budget" in xs:
        text += (
            " On budget axes `mean` is the dashed mean-of-V floor; a point marked ▲ n keys reads"
            " n keys per query, more than its budget."
        )
    if several:
        text += " Line styles tell the results files apart."
    if sampled:
        text += (
            " Thin bars: the 95 % bootstrap interval of the row-sampled estimate (the mean of the "
            "seeds' bounds)."
        )
    if fallback:
        text += " " + fallback
    if left_out:
        text += " Not shown: " + "; ".join(dict.fromkeys(left_out)) + "."
    caption(fig, text, 60 + 45 * len(xs))
    return fig


def _layer_figure(docs: Sequence[RunReport], y: str, labels: Sequence[str]):
    """Error against layer: one line per method × budget (mean over seeds, min–max band), and the
    mean-of-V floor of each layer as a dashed line."""
    if not any(d.layers for d in docs):
        raise UsageError(
            "no result has a layer: --x layer draws runs over a capture's layers.",
            hint="Run `kdecli compare CAPTURE.h5 --all-layers` (or CAPTURE.h5:/layer*).",
        )
    fig = new_figure(9.0, 5.2)
    ax = fig.subplots()
    several = len(docs) > 1
    values: list[float] = []
    for doc, label, (_, marker) in zip(docs, labels, DOC_STYLES * len(docs)):  # a marker per file
        where = f" · {label}" if several else ""
        phased = len(doc.phases) > 1
        for phase in doc.phases:  # a floor per phase where there are two
            floors = [
                (x.layer, x.floors.mean.get(y))
                for x in doc.layers
                if x.layer is not None and x.input.phase == phase
            ]
            floors = [(layer, f.mean) for layer, f in floors if f is not None and _finite(f.mean)]
            named = f" · {phase}" if phased else ""
            if floors:
                ax.plot(*zip(*floors), label=f"mean-of-V floor{named}{where}", **FLOOR)
        lines: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in doc.results:
            if r.ok and r.layer is not None and r.role in ("approximation", "oracle"):
                if _finite(r.error(y)):
                    lines[r.method, r.budget, r.role, r.phase][r.layer].append(r.error(y))
        methods = list(dict.fromkeys(key[0] for key in lines))
        budgets = list(dict.fromkeys(key[1] for key in lines))
        for (method, budget, role, phase), by_layer in lines.items():
            # a colour per method, a line style per budget
            colour = f"C{methods.index(method) % 10}"
            style = ("-", "--", ":", "-.")[budgets.index(budget) % 4]
            layers = sorted(by_layer)
            means = [sum(by_layer[n]) / len(by_layer[n]) for n in layers]
            values += means
            name = method + (" (oracle)" if role == "oracle" else "")
            name += "" if budget is None else f" @ {budget}"
            name += (f" · {phase}" if phased else "") + where
            marker_of = "x" if phased and phase == "decode" else marker  # decode: crosses
            ax.plot(layers, means, linestyle=style, marker=marker_of, color=colour, label=name,
                    gid="method")  # fmt: skip
            if any(len(by_layer[n]) > 1 for n in layers):
                low = [min(by_layer[n]) for n in layers]
                high = [max(by_layer[n]) for n in layers]
                ax.fill_between(layers, low, high, color=colour, alpha=0.18, linewidth=0,
                                gid="band")  # fmt: skip
    if not values:
        raise UsageError(f"nothing to plot: no result with status ok has {y} and a layer.")
    log_if_spread(ax, values)
    all_layers = sorted({x.layer for d in docs for x in d.layers if x.layer is not None})
    ax.set_xticks(all_layers)
    ax.set_xlabel(X_AXES["layer"])
    ax.set_ylabel(Y_LABELS[y] + "\nmean over slices and seeds")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    title = _title(docs, y, ["layer"])
    for doc in docs:  # name the capture, not its first layer
        title = title.replace(doc.input.source, doc.input.source.rsplit(":/", 1)[0], 1)
    fig.suptitle(title, fontsize="medium", x=0.01, ha="left")
    return fig


def plot_reports(
    docs: Sequence[RunReport | dict[str, Any]],
    path: str | os.PathLike,
    x: str | Sequence[str] = "budget",
    y: str = "rel_spectral",
    *,
    names: Sequence[str] | None = None,
) -> Path:
    """Draw ``docs`` (``RunReport``s, or their JSON documents as dicts) to
    ``path`` (.png, .svg or .pdf) and return the path."""
    check_plot_path(path)  # before drawing: a bad path is refused at once
    return save_figure(figure(docs, x, y, names=names), path)
