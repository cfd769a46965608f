"""Render a ``RunReport``: a table for people (rich or Markdown), JSON / JSONL / CSV for other tools.

The table has one row per setting (method × budget × parameters: seeds aggregated, mean ± std of
each record's slice-mean); JSON, JSONL and CSV keep every record.  The rich table fits the width it
is printed at: method names and numbers are never cut.  The method, budget, the primary metric's
mean ± std, time, speed-up and status are always shown; the other columns join, in the order of
``OPTIONAL``, while they fit, and a line under the table names what was left out and how to get it.
``--columns`` chooses the columns instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdecli.errors import UsageError
from kdecli.experiments.compare.aggregate import (
    Setting,
    aggregate,
    mean_over_layers,
    primary_metric,
)
from kdecli.experiments.compare.records import (
    RunReport,
    Summary,
    jsonl_header,
    jsonl_pareto,
    jsonl_result,
    to_json,
)
from kdecli.measure.metrics import METRICS

FORMATS = ("table", "json", "jsonl", "csv")
REPORT_FORMATS = ("table", "markdown", "csv", "json", "jsonl")
PRIMARY = "rel_spectral"
FILE_WIDTH = 200  # a table written to a file or a pipe is not squeezed into 80 columns
# The status column wraps (its text is a sentence); an optional column joins only if status keeps
# this much room, enough for "ok · not below mean floor" on one line.
STATUS_ROOM = 25


# ---- cells ---------------------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_flops(flops: float | None) -> str:
    if flops is None:
        return "—"
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= factor:
            return f"{flops / factor:.3g} {unit}"
    return f"{flops:.3g}"


def fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items()) or "—"


def method_label(setting: Setting) -> str:
    return setting.method + (" (oracle)" if setting.role == "oracle" else "")


def budget_label(setting: Setting) -> str:
    return "—" if setting.budget is None else str(setting.budget)


def status_text(setting: Setting) -> str:
    """ok, or what went wrong; then the floor marker and what else the method estimates."""
    text = setting.status if setting.status == "ok" else f"{setting.status}: {setting.reason}"
    ok = len(setting.ok_records)
    if setting.status == "ok" and ok < setting.seeds:
        text = f"{ok}/{setting.seeds} seeds ok: {setting.reason}"
    if setting.beats_mean_floor is False:
        text += " · not below mean floor"
    if setting.estimates != "softmax":
        text += f" · estimates {setting.estimates}"
    return text


NOT_AVAILABLE = "n/a (rows)"  # a metric a row-sampled reference cannot give (rel_spectral)
LOWER_BOUND = "≥ "  # a max over sampled rows: the true max is at least this


def _missing(setting: Setting, metric: str) -> str:
    return NOT_AVAILABLE if setting.unavailable(metric) else "—"


def _error_mean(metric: str) -> Callable[[Setting], str]:
    def cell(setting: Setting) -> str:
        stats = setting.errors.get(metric)
        if stats is None:
            return _missing(setting, metric)
        text = f"{stats.mean:.4f}"
        if len(setting.ok_records) > 1:
            text += f" ± {stats.std:.4f}"
        if stats.low is not None and stats.high is not None:
            # a row sample's 95 % interval, under the estimate (a line of its own keeps the column
            # narrow; Markdown puts it beside)
            text += f"\n[{stats.low:.4f}, {stats.high:.4f}]"
        return (LOWER_BOUND if stats.lower_bound else "") + text

    return cell


def _error_max(metric: str) -> Callable[[Setting], str]:
    def cell(setting: Setting) -> str:
        stats = setting.errors.get(metric)
        if stats is None:
            return _missing(setting, metric)
        return (LOWER_BOUND if stats.lower_bound else "") + f"{stats.max:.4f}"

    return cell


EXTRAPOLATED = "≈"  # marks an exact time (and the speed-up over it) scaled from a row sample


def _extrapolated(setting: Setting, which: str = "exact_s") -> bool:
    """Is exact attention's time (``exact_s``, or ``exact_backward_s``) scaled from a row sample?"""
    time = setting.time
    stat = None if time is None else getattr(time, which)
    return bool(stat is not None and stat.extrapolated)


def _mark(setting: Setting, text: str, which: str = "exact_s") -> str:
    return f"{EXTRAPOLATED} {text}" if _extrapolated(setting, which) and text != "—" else text


def _speedup(setting: Setting) -> str:
    time = setting.time
    return _mark(setting, f"{time.speedup:.1f}×") if time is not None and time.speedup else "—"


def _exact_time(setting: Setting) -> str:
    return _mark(setting, fmt_time(setting.time and setting.time.exact_median))


def _backward_time(setting: Setting) -> str:
    return fmt_time(setting.time and setting.time.backward_median)


def _backward_speedup(setting: Setting) -> str:
    time = setting.time
    if time is None or not time.backward_speedup:
        return "—"
    return _mark(setting, f"{time.backward_speedup:.1f}×", "exact_backward_s")


def _exact_backward_time(setting: Setting) -> str:
    text = fmt_time(setting.time and setting.time.exact_backward_median)
    return _mark(setting, text, "exact_backward_s")


def _timed_backward(setting: Setting) -> bool:
    """Was a forward + backward asked for in this setting's timing (timed, or why not)?"""
    time = setting.time
    return time is not None and (
        time.backward_s is not None
        or time.exact_backward_s is not None
        or time.backward_note is not None
    )


def _fraction(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _keys(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


@dataclass(frozen=True)
class Column:
    """One table column: its ``--columns`` name, header, and how a setting fills it."""

    key: str
    header: str
    cell: Callable[[Setting], str]
    justify: str = "right"
    needs: str | None = None  # a metric the column shows; absent from every row -> no column
    flat: str | None = None  # the header on one line (Markdown), when it differs

    @property
    def one_line_header(self) -> str:
        return self.flat or self.header.replace("\n", " ")


def _columns() -> list[Column]:
    """Every column, in display order."""
    columns = [
        Column("layer", "layer", lambda s: "—" if s.layer is None else str(s.layer), "left"),
        Column("method", "method", method_label, "left"),
        Column("budget", "budget", budget_label),
    ]
    for metric in METRICS:
        short = "bound" if metric == "bound_normalized" else metric
        columns.append(Column(short, f"{metric}\nmean ± std", _error_mean(metric), needs=metric))
        columns.append(
            Column(f"{short}_max", "max", _error_max(metric), needs=metric, flat=f"{metric} max")
        )
    columns += [
        Column("time", "time", lambda s: fmt_time(s.time and s.time.method_median)),
        Column("exact_time", "exact", _exact_time),
        Column("speedup", "speed-up", _speedup),
        Column("backward", "fwd+bwd", _backward_time),
        Column("exact_backward", "exact\nfwd+bwd", _exact_backward_time, flat="exact fwd+bwd"),
        Column(
            "backward_speedup",
            "fwd+bwd\nspeed-up",
            _backward_speedup,
            flat="fwd+bwd speed-up",
        ),  # fmt: skip
        Column("flops", "FLOPs", lambda s: fmt_flops(s.flops)),
        Column(
            "flops_fraction",
            "FLOPs\n/exact",
            lambda s: _fraction(s.flops_fraction),
            flat="FLOPs / exact",
        ),  # fmt: skip
        Column("keys", "keys\n/query", lambda s: _keys(s.keys_per_query), flat="keys per query"),
        Column("status", "status", status_text, "left"),
    ]
    return columns


COLUMNS = _columns()
COLUMN_KEYS = tuple(c.key for c in COLUMNS)
ALWAYS = ("layer", "method", "budget", "rel_spectral", "time", "speedup", "status")
# Joined while they fit, in this order: the spread of the primary metric first, the forward +
# backward time and its speed-up (present only when --backward timed them, which asks for them),
# the cost as a fraction of exact attention's, then the other metrics, then what the time is
# measured against and what a query pays.
OPTIONAL = (
    "rel_spectral_max", "backward_speedup", "backward", "flops_fraction", "rel_frobenius",
    "max_row_rel", "bound", "exact_time", "exact_backward", "keys", "rel_frobenius_max",
    "max_row_rel_max", "bound_max", "flops",
)  # fmt: skip
BACKWARD_COLUMNS = ("backward", "exact_backward", "backward_speedup")


def parse_columns(text: str | None) -> tuple[str, ...] | None:
    """``--columns a,b,c`` or ``all``; None means choose by width."""
    if text is None:
        return None
    if text.strip() == "all":
        return COLUMN_KEYS
    keys = tuple(key.strip() for key in text.split(",") if key.strip())
    unknown = [key for key in keys if key not in COLUMN_KEYS]
    if unknown or not keys:
        raise UsageError(
            f"--columns: unknown column {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(COLUMN_KEYS)}, or all."
        )
    return keys


def _width(column: Column, rows: Sequence[Setting]) -> int:
    cells = [column.cell(row) for row in rows]
    return max(cell_len(line) for text in (*cells, column.header) for line in text.split("\n"))


def choose_columns(
    rows: Sequence[Setting], width: int, asked: Sequence[str] | None = None
) -> tuple[list[Column], list[str]]:
    """The columns to draw at ``width`` and the names of those left out for lack of room."""
    present = {m for row in rows for m in METRICS if m in row.errors or row.unavailable(m)}
    available = {c.key: c for c in COLUMNS if c.needs is None or c.needs in present}
    if all(row.layer is None for row in rows):  # not a run over a capture's layers
        available.pop("layer")
    if not any(_timed_backward(row) for row in rows):  # no --backward
        for key in BACKWARD_COLUMNS:
            available.pop(key)
    if asked is not None:
        return [available[key] for key in COLUMN_KEYS if key in asked and key in available], []
    widths = {key: _width(column, rows) for key, column in available.items()}
    status_width = min(widths["status"], STATUS_ROOM)

    def table_width(keys: list[str]) -> int:  # each column: its cells, padding 2, a border
        return 1 + sum(3 + (status_width if k == "status" else widths[k]) for k in keys)

    always, optional = ALWAYS, OPTIONAL
    if primary_metric(r for row in rows for r in row.records) != PRIMARY:
        # a row sample: its rel_frobenius estimate leads; rel_spectral (n/a) joins if it fits
        always = tuple("rel_frobenius" if key == PRIMARY else key for key in ALWAYS)
        rest = [key for key in OPTIONAL if key not in ("rel_frobenius", "rel_spectral_max")]
        optional = (PRIMARY, *rest, "rel_spectral_max")
    chosen = [key for key in always if key in available]
    left_out = []
    for key in optional:
        if key not in available:
            continue
        if table_width([*chosen, key]) <= width:
            chosen.append(key)
        else:
            left_out.append(key)
    return [available[key] for key in COLUMN_KEYS if key in chosen], left_out


# ---- the tables ----------------------------------------------------------------------------------


def render_table(report: RunReport, console: Console, columns: Sequence[str] | None = None) -> None:
    rows = table_rows(report)
    chosen, left_out = choose_columns(rows, console.width, columns)
    if columns is not None:
        # asked for explicitly: draw them all, past the terminal's edge rather than cut a number
        natural = 1 + sum(3 + _width(c, rows) for c in chosen)
        console.width = max(console.width, natural)
    table = Table(title=Text(title(report)), title_justify="left")
    for column in chosen:
        wraps = column.key == "status"
        table.add_column(
            column.header,
            justify=column.justify,
            no_wrap=not wraps,
            overflow="fold" if wraps else "ignore",
            min_width=None if wraps else _width(column, rows),
        )
    for row in rows:
        style = None if row.status == "ok" else "red"
        if row.beats_mean_floor is False:
            style = "yellow"
        table.add_row(*(Text(column.cell(row)) for column in chosen), style=style)
    console.print(table)
    if left_out:
        console.print(
            f"Not shown at width {console.width}: {', '.join(left_out)} "
            "(--columns all shows every column; --columns a,b,... chooses).",
            highlight=False,
            markup=False,
        )
    _print_footer(report, rows, console)


def _print_footer(report: RunReport, rows: list[Setting], console: Console) -> None:
    lines = list(
        dict.fromkeys(  # once per setting, not once per layer
            f"  {method_label(r)} @ {budget_label(r)}: {fmt_params(r.params)}"
            for r in rows
            if r.params
        )
    )
    if lines:
        console.print("resolved parameters:\n" + "\n".join(lines), highlight=False, markup=False)
    if report.pareto is not None:
        render_pareto(report, rows, console)
    console.print(floors_line(report), highlight=False, markup=False)
    console.print(reference_line(report), highlight=False, markup=False)
    console.print(environment_line(report), highlight=False, markup=False)
    note = extrapolated_line(rows)
    if note:
        console.print(note, highlight=False, markup=False)
    backward = backward_lines(rows)
    if backward:
        console.print("\n".join(backward), highlight=False, markup=False)
    if report.interrupted:
        console.print(
            f"The run was interrupted: {len(report.results)} records finished.", style="yellow"
        )


def title(report: RunReport) -> str:
    """The input (the first layer's, for a run over layers) and how many layers there are."""
    text = report.input.describe()
    if len(report.layers) > 1:
        text += f"  ({len(report.layers)} layers: {', '.join(str(x.layer) for x in report.layers)})"
    return text


def table_rows(report: RunReport) -> list[Setting]:
    """The table's rows: one per (layer ×) method × budget; then, over layers, their means."""

    metric = report.reference.primary_metric  # rel_frobenius under a row sample

    def floor(layer: int | None) -> float | None:
        return report.floors_of(layer).mean_floor(metric)

    rows = aggregate(report.results, floor, metric)
    if report.layers:
        rows += mean_over_layers(rows, floor, metric)
    return rows


def _fmt_estimate(summary: Summary) -> str:
    """A floor's value: ``0.1234``, with ``[low, high]`` under a row sample, ``≥`` for a bound."""
    text = f"{summary.mean:.4g}"
    interval = summary.interval
    if interval is not None and interval.low is not None and interval.high is not None:
        text += f" [{interval.low:.4g}, {interval.high:.4g}]"
    return (LOWER_BOUND if summary.lower_bound else "") + text


def floors_line(report: RunReport) -> str:
    metric = report.reference.primary_metric
    if report.layers:
        per_layer = [(x.layer, x.floors.mean_floor(metric)) for x in report.layers]
        listed = ", ".join(f"{layer}: {value:.4g}" for layer, value in per_layer)
        mean = sum(value for _, value in per_layer) / len(per_layer)
        return (
            f"floors: mean-of-V baseline {metric} by layer {listed} (mean {mean:.4g}); zero "
            "output 1 on every relative norm. Rows `all`: the mean over layers, ± std over layers."
        )
    mean, zero = report.floors.mean, report.floors.zero
    others = [m for m in ("rel_frobenius", "max_row_rel") if m != metric and m in mean]
    listed = ", ".join(f"{m} {_fmt_estimate(mean[m])}" for m in others)
    text = (
        f"floors: mean-of-V baseline {metric} {_fmt_estimate(mean[metric])} ({listed}); "
        "zero output 1 on every relative norm"
    )
    if "bound_normalized" in zero and zero["bound_normalized"].mean is not None:
        text += f" (bound_normalized {zero['bound_normalized'].mean:.4g})"
    if report.reference.sampled:
        text += (
            f"; measured on the same sampled rows as every method, and `not below mean floor` "
            f"compares {metric}"
        )
    return text + "."


def reference_line(report: RunReport) -> str:
    """Which exact reference the errors are measured against, and what that means for them."""
    ref = report.reference
    spec = _reference_spec(report)
    asked = "" if ref.requested == spec else f" (--reference {ref.requested})"
    if not ref.sampled:
        return f"reference: full{asked}: the exact float64 output of every query."
    n_q = report.input.shape.n_q
    level = f"{100 * (ref.level or 0.95):g} %"
    return (
        f"reference: rows:{ref.rows}{asked}: exact float64 outputs of {ref.rows} of {n_q} queries, "
        f"the same rows in every slice (drawn from seed {ref.seed}). rel_frobenius is a ratio "
        f"estimate, [low, high] its {level} bootstrap interval ({ref.draws} resamples of the "
        "rows; over seeds, the mean of the seeds' bounds); max_row_rel is the max over the "
        f"sampled rows, a lower bound ({LOWER_BOUND.strip()}); rel_spectral and bound_normalized "
        f"need every row: {NOT_AVAILABLE}."
    )


def extrapolated_line(rows: Sequence[Setting]) -> str | None:
    """The footnote of ``≈``: exact attention's time (or its forward + backward's) came from a
    row sample."""
    parts = sorted(
        {
            (getattr(s.time, which).extrapolated_rows, s.first.environment.device)
            for s in rows
            for which in ("exact_s", "exact_backward_s")
            if _extrapolated(s, which)
        },
        key=str,
    )
    if not parts:
        return None
    sizes = ", ".join(f"{r} rows" for r, _ in parts)
    return (
        f"{EXTRAPOLATED} exact time extrapolated from {sizes} (too costly to time in full: SDPA "
        "timed on those query rows against every key, scaled by n_q/R; causal, also by the causal "
        "fraction); the speed-up divides it."
    )


def backward_lines(rows: Sequence[Setting]) -> list[str]:
    """Under the table: why a setting's forward + backward was not timed (its forward stands)."""
    notes = dict.fromkeys(
        f"  {method_label(s)} @ {budget_label(s)}: {s.time.backward_note}"
        for s in rows
        if s.time is not None and s.time.backward_note
    )
    return ["fwd+bwd not timed:", *notes] if notes else []


def environment_line(report: RunReport) -> str:
    envs = list(dict.fromkeys(r.environment for r in report.results)) or [report.environment]
    where = "; ".join(
        f"device {e.device} ({e.device_name}), dtype {e.dtype}, {e.threads} threads, torch {e.torch}"
        for e in envs
    )
    return (
        f"{where}; errors are means over {report.input.shape.slices} batch×head slices (± std "
        "over seeds; max over slices and seeds); time is the median."
    )


def render_pareto(report: RunReport, rows: list[Setting], console: Console) -> None:
    """The small table under the main one: each method's cheapest setting that reaches the target."""
    pareto = report.pareto
    metric, target = pareto.metric, pareto.target_error
    table = Table(
        title=f"cheapest setting with seed-mean {metric} ≤ {target:g} (fewest FLOPs, then time)",
        title_justify="left",
    )
    for column, justify in (
        ("method", "left"),
        ("budget", "right"),
        ("FLOPs", "right"),
        (metric, "right"),
        ("time", "right"),
        ("parameters", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for name, pick in pareto.methods.items():
        if pick is None:
            reached = [
                r.error(metric)
                for r in rows
                if r.method == name and r.status == "ok" and r.error(metric) is not None
            ]
            best = (
                f"not reached (best {min(reached):.4f})"
                if reached
                else "not reached (no ok result)"
            )
            table.add_row(*map(Text, (name, "—", "—", best, "—", "—")), style="yellow")
            continue
        budget = "—" if pick.budget is None else str(pick.budget)
        cells = (name, budget, fmt_flops(pick.flops), f"{pick.error:.4g}", fmt_time(pick.method_s))
        table.add_row(*map(Text, (*cells, fmt_params(pick.params))))
    console.print(table)


def to_markdown(report: RunReport, columns: Sequence[str] | None = None) -> str:
    """The table as GitHub Markdown (every column unless ``columns`` chooses), with its caption."""
    rows = table_rows(report)
    chosen, _ = choose_columns(rows, 10**6, columns)

    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    headers = [escape(c.one_line_header) for c in chosen]
    lines = [
        f"**{escape(title(report))}**",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if c.justify == "right" else "---" for c in chosen) + "|",
    ]
    lines += ["| " + " | ".join(escape(c.cell(row)) for c in chosen) + " |" for row in rows]
    lines += ["", floors_line(report), "", reference_line(report), "", environment_line(report)]
    note = extrapolated_line(rows)
    if note:
        lines += ["", note]
    backward = backward_lines(rows)
    if backward:
        lines += [
            "",
            *(f"- {line.strip()}" if line.startswith("  ") else line for line in backward),
        ]
    if report.interrupted:
        lines += ["", f"The run was interrupted: {len(report.results)} records finished."]
    if report.pareto is not None:
        picks = [
            f"- {name}: "
            + (
                "not reached"
                if pick is None
                else f"budget {pick.budget}, {fmt_flops(pick.flops)} FLOPs, "
                f"{report.pareto.metric} {pick.error:.4g}"
            )
            for name, pick in report.pareto.methods.items()
        ]
        lines += [
            "",
            f"Cheapest setting with {report.pareto.metric} ≤ {report.pareto.target_error:g}:",
            *picks,
        ]
    return "\n".join(lines) + "\n"


# ---- machine formats -----------------------------------------------------------------------------

CSV_FIELDS = [
    "method", "budget", "seed", "status", "reason", "params", "oracle",
    *(f"{m}_{s}" for m in METRICS for s in ("mean", "max")),
    "method_s_median", "method_s_iqr", "exact_s_median", "speedup", "flops", "beats_mean_floor",
    "scale", "dtype", "device", "keys_per_query", "flops_fraction", "budget_mode",
    "method_s_repeats", "exact_s_extrapolated", "peak_memory_bytes", "memory_source",
    "rel_frobenius_low", "rel_frobenius_high",
    "backward_s_median", "backward_s_iqr", "exact_backward_s_median", "backward_speedup",
    "exact_backward_s_extrapolated", "backward_peak_memory_bytes", "backward_note",
    "reference",  # last, as before 0.5
]  # fmt: skip


def to_csv(report: RunReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in report.results:
        row = {
            "method": r.method,
            "budget": r.budget,
            "seed": r.seed,
            "status": r.status,
            "reason": r.reason,
            "oracle": r.oracle,
            "flops": r.flops,
            "beats_mean_floor": r.beats_mean_floor,
            "params": json.dumps(r.params, sort_keys=True),
        }
        for m in METRICS:
            summary = r.errors.get(m)
            row[f"{m}_mean"] = None if summary is None else summary.mean
            row[f"{m}_max"] = None if summary is None else summary.max
        time, method_s = r.time, r.time and r.time.method_s
        row["method_s_median"] = method_s.median if method_s else None
        row["method_s_iqr"] = method_s.iqr if method_s else None
        row["exact_s_median"] = time.exact_median if time else None
        row["speedup"] = time.speedup if time else None
        row["method_s_repeats"] = method_s.repeats if method_s else None
        row["exact_s_extrapolated"] = time.exact_s.extrapolated if time and time.exact_s else None
        row["peak_memory_bytes"] = method_s.peak_memory_bytes if method_s else None
        row["memory_source"] = method_s.memory_source if method_s else None
        row.update(
            keys_per_query=r.keys_per_query,
            flops_fraction=r.flops_fraction,
            budget_mode=r.budget_mode,
        )
        row.update(scale=report.input.scale, dtype=r.environment.dtype, device=r.environment.device)
        interval = r.errors.get("rel_frobenius", Summary(None, None)).interval
        row["rel_frobenius_low"] = None if interval is None else interval.low
        row["rel_frobenius_high"] = None if interval is None else interval.high
        row["reference"] = _reference_spec(report)
        backward, exact_backward = time and time.backward_s, time and time.exact_backward_s
        row["backward_s_median"] = backward.median if backward else None
        row["backward_s_iqr"] = backward.iqr if backward else None
        row["exact_backward_s_median"] = exact_backward.median if exact_backward else None
        row["backward_speedup"] = time.backward_speedup if time else None
        row["exact_backward_s_extrapolated"] = (
            exact_backward.extrapolated if exact_backward else None
        )
        row["backward_peak_memory_bytes"] = backward.peak_memory_bytes if backward else None
        row["backward_note"] = time.backward_note if time else None
        writer.writerow({k: _finite_or_none(v) for k, v in row.items()})
    return buffer.getvalue()


def _reference_spec(report: RunReport) -> str:
    """``full`` or ``rows:R``: the CSV's ``reference`` column."""
    ref = report.reference
    return f"rows:{ref.rows}" if ref.sampled else "full"


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def render_text(report: RunReport, fmt: str, **options) -> str:
    """``render`` into a string (so a file is written in one piece)."""
    buffer = io.StringIO()
    render(report, fmt, buffer, **options)
    return buffer.getvalue()


def render(
    report: RunReport,
    fmt: str,
    stream: TextIO,
    *,
    width: int | None = None,
    columns: Sequence[str] | None = None,
    colour: bool = False,
) -> None:
    """Write ``report`` to ``stream`` in one of ``REPORT_FORMATS`` (``colour``: ANSI styles in the
    table, for a terminal)."""
    if fmt == "json":
        stream.write(to_json(report) + "\n")
    elif fmt == "jsonl":
        stream.write(jsonl_header(report) + "\n")
        for record in report.results:
            stream.write(jsonl_result(record) + "\n")
        if report.pareto is not None:
            stream.write(jsonl_pareto(report.pareto) + "\n")
    elif fmt == "csv":
        stream.write(to_csv(report))
    elif fmt == "markdown":
        stream.write(to_markdown(report, columns))
    elif fmt == "table":
        if width is None and not stream.isatty():
            width = FILE_WIDTH
        console = Console(file=stream, width=width, soft_wrap=False, force_terminal=colour or None)
        render_table(report, console, columns)
    else:
        raise ValueError(fmt)
