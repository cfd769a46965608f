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
- ``exact`` is the reference (its error is rounding, ~1e-7): it is not drawn as a method.  Its
  median time (the run's SDPA timing) is a vertical line on time plots, and its cost model a
  vertical line on FLOPs plots.  ``mean`` is the mean floor on budget plots and a single point on
  time and FLOPs plots; any other budget-free method is a horizontal line on budget plots and a
  point elsewhere.
- Records whose status is not ``ok`` are left out, and the caption says so.

Matplotlib draws headless (the Agg canvas; no display needed): ``pip install 'kdecli[plot]'``.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdecli.errors import UsageError
from kdecli.files import check_writable
from kdecli.metrics import METRICS

SUFFIXES = (".png", ".svg", ".pdf")
X_AXES = {
    "budget": "budget (keys or features per query)",
    "time": "time per call (s, median)",
    "flops": "FLOPs per call (cost model)",
}
Y_LABELS = {
    "rel_spectral": "rel_spectral  ‖Õ−O‖₂ / ‖O‖₂",
    "rel_frobenius": "rel_frobenius  ‖Õ−O‖_F / ‖O‖_F",
    "max_row_rel": "max_row_rel  maxᵢ ‖Õᵢ−Oᵢ‖ / ‖Oᵢ‖",
    "bound_normalized": "bound_normalized  ‖Õ−O‖₂ / (‖D⁻¹A‖₂‖V‖₂)",
}
READS = ("`kdecli plot` reads the JSON or JSONL that `kdecli compare --format json|jsonl "
         "--output FILE` writes.")
DOC_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
BAND = "min–max over seeds"


# ---- matplotlib and paths ----------------------------------------------------------------------

def require_matplotlib():
    """The ``matplotlib`` module, or a UsageError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib, which is not installed.",
                         hint="pip install 'kdecli[plot]'") from None
    return matplotlib


def check_plot_path(path: str | os.PathLike) -> Path:
    """Refuse an image path that cannot be written, before a long run rather than after it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"{path}: cannot write a {suffix or 'suffix-less'} image; "
                         f"give a file name ending in {', '.join(SUFFIXES)}.")
    check_writable(path, str(path))
    require_matplotlib()
    return path


# ---- reading results ---------------------------------------------------------------------------

def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file (JSON document or JSONL stream) into the JSON document's form."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file." if not path.exists() else f"{path}: is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: is not a text file.", hint=READS) from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"{path}: is empty.", hint=READS)
    if lines[0].startswith("method,budget,"):
        raise UsageError(f"{path}: is the CSV of `kdecli compare`; plotting needs its JSON.", hint=READS)
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if isinstance(first, dict) and first.get("type") == "run":
        doc = _from_jsonl(lines, path)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: is not JSON (line {exc.lineno}: {exc.msg}).", hint=READS) from None
    validate_document(doc, str(path))
    return doc


def _from_jsonl(lines: list[str], path: Path) -> dict[str, Any]:
    head: dict[str, Any] = {}
    results, pareto = [], None
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: line {number} is not JSON ({exc.msg}).", hint=READS) from None
        kind = item.get("type") if isinstance(item, dict) else None
        if number == 1:
            head = {key: value for key, value in item.items() if key != "type"}
        elif kind == "result":
            results.append({key: value for key, value in item.items() if key != "type"})
        elif kind == "pareto":
            pareto = {key: value for key, value in item.items() if key != "type"}
        else:
            raise UsageError(
                f"{path}: line {number} is not a result (type {kind!r}); after the first "
                "{\"type\": \"run\"} line every line must be {\"type\": \"result\", ...}.", hint=READS)
    doc = {**head, "results": results}
    if pareto is not None:
        doc["pareto"] = pareto
    return doc


def validate_document(doc: Any, where: str) -> None:
    """Raise a UsageError naming ``where`` and the problem unless ``doc`` is a compare result."""
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: holds a JSON {type(doc).__name__}; expected a kdecli result "
                         "document (an object with input, environment, floors and results).", hint=READS)
    if doc.get("report") == "inspect":
        raise UsageError(f"{where}: is a `kdecli inspect` report; plots are drawn from "
                         "`kdecli compare` results.", hint=READS)
    missing = [key for key in ("schema_version", "input", "environment", "floors", "results")
               if key not in doc]
    if missing:
        raise UsageError(f"{where}: is not a kdecli result document; it lacks "
                         f"{', '.join(missing)}.", hint=READS)
    if doc["schema_version"] != 1:
        raise UsageError(f"{where}: has schema_version {doc['schema_version']!r}; this kdecli reads 1.",
                         hint="Plot it with the kdecli version that wrote it.")
    if not isinstance(doc["results"], list):
        raise UsageError(f"{where}: `results` must be a list; got {type(doc['results']).__name__}.")
    for i, record in enumerate(doc["results"]):
        if not (isinstance(record, dict) and {"method", "budget", "status", "errors"} <= set(record)):
            raise UsageError(f"{where}: result {i + 1} lacks method, budget, status or errors.",
                             hint=READS)


# ---- from records to series --------------------------------------------------------------------

@dataclass
class Point:
    budget: int | None
    x: float | None
    ys: list[float]  # one slice-mean per seed

    @property
    def mean(self) -> float:
        return sum(self.ys) / len(self.ys)


@dataclass
class Series:
    method: str
    oracle: bool
    points: list[Point] = field(default_factory=list)

    @property
    def budget_free(self) -> bool:
        return all(p.budget is None for p in self.points)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _x_value(record: dict[str, Any], x: str) -> float | None:
    if x == "budget":
        return record["budget"]
    if x == "time":
        return ((record.get("time") or {}).get("method_s") or {}).get("median")
    return record.get("flops")


def collect_series(doc: dict[str, Any], x: str, y: str) -> tuple[list[Series], list[str]]:
    """One Series per method (ok records only) and notes on what was left out."""
    groups: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    failed: dict[str, set[str]] = defaultdict(set)
    for record in doc["results"]:
        if record["status"] != "ok":
            failed[record["method"]].add(str(record["status"]))
            continue
        key = (record["budget"], json.dumps(record.get("params", {}), sort_keys=True))
        groups[record["method"]][key].append(record)
    series, notes, no_x = [], [], []
    for method, settings in groups.items():
        s = Series(method, any(r.get("oracle") for rs in settings.values() for r in rs))
        for (budget, _), records in settings.items():
            ys = [r["errors"][y]["mean"] for r in records
                  if isinstance(r["errors"].get(y), dict) and _finite(r["errors"][y].get("mean"))]
            xv = next((v for v in (_x_value(r, x) for r in records) if _finite(v) and v > 0), None)
            if not ys:
                continue
            if xv is None and not (x == "budget" and budget is None):
                no_x.append(method)
                continue
            s.points.append(Point(budget, None if xv is None else float(xv), ys))
        s.points.sort(key=lambda p: (p.budget is None, p.budget or 0, p.x or 0))
        if s.points:
            series.append(s)
    for method, statuses in failed.items():
        if method not in groups:
            notes.append(f"{method} ({'/'.join(sorted(statuses))})")
    if no_x:
        notes.append(f"{', '.join(sorted(set(no_x)))} (no {x})")
    return series, notes


# ---- drawing ------------------------------------------------------------------------------------

def _doc_labels(docs: Sequence[dict], names: Sequence[str] | None) -> list[str]:
    """Tell documents apart by device and dtype; then by file name or input source; then number."""
    def device(env):
        return env.get("device", "?") if env.get("device", "cpu") == "cpu" else \
            env.get("device_name") or env.get("device", "?")

    labels = [f"{device(d['environment'])} {d['environment'].get('dtype', '?')}" for d in docs]
    if len(set(labels)) < len(labels):
        extra = list(names) if names else [str(d["input"].get("source", "?")) for d in docs]
        labels = [f"{label} · {more}" for label, more in zip(labels, extra)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def _distinct(values: Sequence[str]) -> str:
    return " vs ".join(dict.fromkeys(values))


def _title(docs: Sequence[dict], y: str, xs: Sequence[str]) -> str:
    def shape(inp):
        s = inp.get("shape", {})
        return " ".join(f"{k}={s[k]}" for k in ("b", "h", "n_q", "n_k", "d", "d_v") if k in s)

    def env(e):
        name = e.get("device_name")
        return f"{e.get('dtype', '?')} on {e.get('device', '?')}" + (f" ({name})" if name else "")

    inputs = [d["input"] for d in docs]
    causal = any(i.get("causal") for i in inputs)
    return "\n".join([
        f"{y} vs {' and '.join(xs)} · {_distinct([str(i.get('source', '?')) for i in inputs])}",
        f"{_distinct([shape(i) for i in inputs])} · scale "
        f"{_distinct([format(i.get('scale', float('nan')), '.4g') for i in inputs])}"
        + (" · causal" if causal else "")
        + f" · {_distinct([env(d['environment']) for d in docs])}",
    ])


def _exact_time(doc: dict) -> float | None:
    for record in doc["results"]:
        median = (((record.get("time") or {}).get("exact_s")) or {}).get("median")
        if median is not None:
            return median
    return None


def _exact_flops(doc: dict) -> float | None:
    for record in doc["results"]:
        if record["method"] == "exact" and record.get("flops") is not None:
            return record["flops"]
    shape = doc["input"].get("shape") or {}
    try:
        from kdecli.methods import make_method

        flops = make_method("exact").flops(*(shape[k] for k in ("b", "h", "n_q", "n_k", "d", "d_v")))
    except Exception:  # an old or partial document: no reference line rather than no plot
        return None
    return flops if math.isfinite(flops) else None


def _floor(doc: dict, which: str, y: str) -> float | None:
    if which == "zero" and y != "bound_normalized":
        return 1.0
    return ((doc["floors"].get(which) or {}).get(y) or {}).get("mean")


def _fmt_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def figure(
    docs: Sequence[dict[str, Any]], x: str | Sequence[str] = "budget", y: str = "rel_spectral",
    *, names: Sequence[str] | None = None,
):
    """A matplotlib Figure with one panel per x axis (``"budget"``, ``"time"``, ``"flops"``, or
    several, comma-separated).  Artists carry a gid: ``"method"`` for the methods' lines and
    points, ``"band"`` for the seed bands, ``"floor"`` and ``"reference"`` for the other lines.
    ``names`` (one per document, e.g. file names) tell documents on the same device apart."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    xs = [part.strip() for part in x.split(",")] if isinstance(x, str) else list(x)
    for axis in xs:
        if axis not in X_AXES:
            raise UsageError(f"--x must be one of {', '.join(X_AXES)} (or several, comma-separated); "
                             f"got {axis!r}.")
    if y not in METRICS:
        raise UsageError(f"--y must be one of {', '.join(METRICS)}; got {y!r}.")
    if not docs:
        raise UsageError("no results to plot.")
    for i, doc in enumerate(docs):
        validate_document(doc, names[i] if names else f"document {i + 1}")
    if not any(isinstance(r["errors"].get(y), dict) for d in docs for r in d["results"]):
        hint = "Run `kdecli compare` with --bound to measure it." if y == "bound_normalized" else None
        raise UsageError(f"no result holds {y}; nothing to plot.", hint=hint)

    labels = _doc_labels(docs, names)
    several = len(docs) > 1
    methods = list(dict.fromkeys(r["method"] for d in docs for r in d["results"]))
    colors = {m: f"C{i % 10}" for i, m in enumerate(m for m in methods if m != "exact")}
    fig = Figure(figsize=(6.4 * len(xs) + 2.6, 5.2), layout="constrained")
    axes = fig.subplots(1, len(xs), sharey=True, squeeze=False)[0]
    left_out: list[str] = []
    seeds_seen = 1
    for ax, axis in zip(axes, xs):
        values: list[float] = []
        budgets: set[int] = set()
        for doc, label, (dash, marker) in zip(docs, labels, DOC_STYLES * len(docs)):
            series, notes = collect_series(doc, axis, y)
            left_out += [f"{n}{f' in {label}' if several else ''}" for n in notes]
            for s in series:
                if s.method == "exact" or (s.method == "mean" and axis == "budget" and s.budget_free):
                    continue  # the reference, and the mean floor drawn below
                name = s.method + (" (oracle)" if s.oracle else "") + (f" · {label}" if several else "")
                color = colors[s.method]
                seeds_seen = max(seeds_seen, *(len(p.ys) for p in s.points))
                values += [v for p in s.points for v in p.ys]
                if s.budget_free and axis == "budget":
                    ax.axhline(s.points[0].mean, color=color, linestyle="-.", label=f"{name} (no budget)",
                               gid="method")
                    continue
                px = [p.x for p in s.points]
                ax.plot(px, [p.mean for p in s.points], linestyle="none" if s.budget_free else dash,
                        marker=marker, color=color, label=name, gid="method")
                if any(len(p.ys) > 1 for p in s.points):
                    low, high = [min(p.ys) for p in s.points], [max(p.ys) for p in s.points]
                    if all(a <= b for a, b in zip(px, px[1:])):
                        ax.fill_between(px, low, high, color=color, alpha=0.18, linewidth=0, gid="band")
                    else:  # x steps back (timing noise): a band would fold over itself; use bars
                        ax.vlines(px, low, high, color=color, alpha=0.35, linewidth=4, gid="band")
                budgets.update(p.budget for p in s.points if p.budget is not None)
        if not values:
            continue
        floors = {}
        for doc, label in zip(docs, labels):
            value = _floor(doc, "mean", y)
            if value is not None:
                floors.setdefault(round(value, 6), (value, label))
        for value, label in floors.values():
            where = f" · {label}" if len(floors) > 1 else ""
            ax.axhline(value, color="0.35", linestyle="--", linewidth=1, gid="floor",
                       label=f"mean-of-V floor {value:.3g}{where}")
        positive = [v for v in values + [v for v, _ in floors.values()] if v > 0]
        if positive and max(positive) > 10 * min(positive):
            ax.set_yscale("log", nonpositive="mask")
        zero = _floor(docs[0], "zero", y)
        if zero is not None and zero <= 2 * max(values):
            ax.axhline(zero, color="0.35", linestyle=":", linewidth=1, gid="floor",
                       label=f"zero output {zero:.3g}")
        for doc, label, (dash, _) in zip(docs, labels, DOC_STYLES * len(docs)):
            ref = _exact_time(doc) if axis == "time" else _exact_flops(doc) if axis == "flops" else None
            if ref is not None:
                text = _fmt_seconds(ref) if axis == "time" else f"{ref:.3g} FLOPs"
                ax.axvline(ref, color="black", linestyle=dash, linewidth=1, gid="reference",
                           label=f"exact attention {text}" + (f" · {label}" if several else ""))
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
        raise UsageError(f"nothing to plot: no result with status ok has {y} and "
                         f"{' / '.join(xs)}{why}.", hint=hint)
    fig.suptitle(_title(docs, y, xs), fontsize="medium", x=0.01, ha="left")
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize="small")
    caption = (f"Points: mean over seeds of each record's slice-mean {y}; bands (bars where x steps "
               f"back): {BAND} "
               f"(up to {seeds_seen} seed{'s' if seeds_seen > 1 else ''}). exact is the reference "
               "(error ≈ rounding): not drawn as a method.")
    if "budget" in xs:
        caption += " On budget axes `mean` is the dashed mean-of-V floor."
    if several:
        caption += " Line styles tell the results files apart."
    if left_out:
        caption += " Not shown: " + "; ".join(dict.fromkeys(left_out)) + "."
    fig.text(0.01, -0.01, "\n".join(textwrap.wrap(caption, 60 + 45 * len(xs))), ha="left", va="top",
             fontsize="small", gid="caption")
    return fig


def plot_reports(
    docs: Sequence[dict[str, Any]], path: str | os.PathLike, x: str | Sequence[str] = "budget",
    y: str = "rel_spectral", *, names: Sequence[str] | None = None,
) -> Path:
    """Draw ``docs`` (result documents, as ``RunReport.as_dict`` or ``load_results`` give them) to
    ``path`` (.png, .svg or .pdf) and return the path."""
    path = check_plot_path(path)
    fig = figure(docs, x, y, names=names)
    try:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    except OSError as exc:
        from kdecli.errors import RuntimeFailure

        raise RuntimeFailure(f"cannot write {path}: {exc.strerror or exc}.") from None
    return path
