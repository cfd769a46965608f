"""Render a ``RunReport``: a table for people (rich or Markdown), JSON / JSONL / CSV for other tools.

The table has one row per setting (method × budget × parameters: seeds aggregated, mean ± std of
each record's slice-mean; ``kdecli.experiments.compare.columns`` says what each column shows and
which are shown); JSON, JSONL and CSV keep every record.  The rich table fits the width it is
printed at (``kdecli.render.table``): method names and numbers are never cut, and a line under the
table names what was left out and how to get it.  ``--columns`` chooses the columns instead.
Under the table: the verdict (``kdecli.experiments.verdict``: what the numbers mean, also the
JSON's ``summary``), the resolved parameters (``verbose``: ``--verbose``), the cheapest settings
(``--target-error``), the floors, the reference, the environment and what the marks (``≈``,
``≥``) mean; last, with ``--per-head``, each setting's worst heads
(``kdecli.experiments.compare.heads``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdecli.experiments.compare.aggregate import Setting, aggregate, mean_over_layers
from kdecli.experiments.compare.columns import (
    ALWAYS,
    COLUMN_KEYS,
    EXTRAPOLATED,
    LOWER_BOUND,
    NOT_AVAILABLE,
    budget_label,
    choose_columns,
    extrapolated,
    layout,
    method_label,
    parse_columns,
)
from kdecli.experiments.compare.records import (
    LayerInfo,
    Result,
    RunReport,
    jsonl_header,
    jsonl_layer,
    jsonl_pareto,
    jsonl_result,
    to_json,
)
from kdecli.experiments.verdict import compare_verdict
from kdecli.measure.figures import DIAGNOSTIC_FIGURES, Summary
from kdecli.measure.metrics import METRICS
from kdecli.render import table
from kdecli.render.cells import fmt_flops, fmt_params, fmt_time
from kdecli.render.safe import printable_lines
from kdecli.render.table import FILE_WIDTH
from kdecli.render.writers import csv_text

__all__ = [
    "ALWAYS", "COLUMN_KEYS", "FILE_WIDTH", "FORMATS", "REPORT_FORMATS", "choose_columns",
    "parse_columns", "render", "render_table", "render_text", "to_csv", "to_json", "to_markdown",
]  # fmt: skip

FORMATS = ("table", "json", "jsonl", "csv", "markdown")
REPORT_FORMATS = ("table", "markdown", "csv", "json", "jsonl")


# ---- the tables ----------------------------------------------------------------------------------


def render_table(
    report: RunReport,
    console: Console,
    columns: Sequence[str] | None = None,
    verbose: bool = True,
) -> None:
    """The table, the verdict under it, then the footer (``verbose``: with the resolved
    parameters of every setting)."""
    rows = table_rows(report)
    choice = table.choose(layout(rows), rows, console.width, columns)
    table.draw(console, title(report), choice, rows, _style)
    console.print(compare_verdict(report).text(), highlight=False, markup=False)
    _print_footer(report, rows, console, verbose)


def _style(row: Setting) -> str | None:
    """Red: failed; yellow: no better than the mean-of-V floor."""
    if row.beats_mean_floor is False:
        return "yellow"
    return None if row.status == "ok" else "red"


def _print_footer(
    report: RunReport, rows: list[Setting], console: Console, verbose: bool = True
) -> None:
    lines = verbose and list(
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
    """The input (the first part's, for a run over layers or phases), how many layers there are,
    and the phases when there are two."""
    text = report.input.describe()
    layers = list(dict.fromkeys(x.layer for x in report.layers))
    if len(layers) > 1:
        text += f"  ({len(layers)} layers: {', '.join(str(layer) for layer in layers)})"
    phases = report.phases
    if len(phases) > 1:
        decode = next((x.input for x in report.layers if x.input.phase == "decode"), None)
        queries = f" (the last {decode.queries} queries)" if decode else ""
        text += f"  phases: {', '.join(phases)}{queries}"
    return text


def table_rows(report: RunReport) -> list[Setting]:
    """The table's rows: one per (layer ×) method × budget; then, over two layers or more, their
    means."""

    metric = report.reference.primary_metric  # rel_frobenius under a row sample

    def floor(record: Result) -> float | None:
        return report.floors_of(record.layer, record.phase).mean_floor(metric)

    rows = aggregate(report.results, floor, metric)
    if len({layer.layer for layer in report.layers}) > 1:  # a mean over one layer is that layer
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
    if len(report.phases) > 1 and not any(x.layer is not None for x in report.layers):
        listed = ", ".join(
            f"{x.input.phase} {x.floors.mean_floor(metric):.4g}" for x in report.layers
        )
        return (
            f"floors: mean-of-V baseline {metric} by phase {listed} (decode: each query's mean "
            "of V over its own prefix); zero output 1 on every relative norm."
        )
    if report.layers:
        per_layer = [(_part_name(x), x.floors.mean_floor(metric)) for x in report.layers]
        layered = len({x.layer for x in report.layers}) > 1  # table_rows adds the `all` rows
        listed = ", ".join(f"{layer}: {value:.4g}" for layer, value in per_layer)
        means = []
        for phase in report.phases:  # a mean over layers is one phase's
            values = [x.floors.mean_floor(metric) for x in report.layers if x.input.phase == phase]
            name = f"{phase} " if len(report.phases) > 1 else ""
            means.append(f"{name}{sum(values) / len(values):.4g}" if values else "")
        return (
            f"floors: mean-of-V baseline {metric} by layer {listed} (mean "
            f"{', '.join(m for m in means if m)}); zero output 1 on every relative norm."
            + (" Rows `all`: the mean over layers, ± std over layers." if layered else "")
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


def _part_name(part: LayerInfo) -> str:
    """A layer of a capture, with its phase where the run measured two: ``3 decode``."""
    return str(part.layer) + ("" if part.input.phase == "prefill" else f" {part.input.phase}")


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
            if extrapolated(s, which)
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
    judged = f"every head's {metric}" if pareto.every_head else f"seed-mean {metric}"
    table = Table(
        title=f"cheapest setting with {judged} ≤ {target:g} (fewest FLOPs, then time)",
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
    if pareto.every_head:  # the best a method reached is its best worst head
        from kdecli.experiments.compare.heads import every_head_settings

        rows = every_head_settings(report.results, metric)
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


def to_markdown(
    report: RunReport, columns: Sequence[str] | None = None, per_head: bool = False
) -> str:
    """The table as GitHub Markdown (every column unless ``columns`` chooses), with its caption
    (``per_head``: and the worst heads of each setting, ``kdecli.experiments.compare.heads``)."""
    rows = table_rows(report)
    lines = table.markdown_table(layout(rows), rows, title(report), columns)
    lines += ["", compare_verdict(report).text()]
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
        every = " on every head" if report.pareto.every_head else ""
        lines += [
            "",
            f"Cheapest setting with {report.pareto.metric} ≤ {report.pareto.target_error:g}"
            f"{every}:",
            *picks,
        ]
    if per_head:
        from kdecli.experiments.compare.heads import worst_heads_markdown

        lines += ["", *worst_heads_markdown(report)]
    # the cells are escaped and cut; the lines around them quote data too (names, notes)
    return printable_lines("\n".join(lines), None) + "\n"


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
    "reference",  # as before 0.5
    "phase",  # prefill, or decode (the last M queries): from 0.8, after what was there before
    # why the estimate is wrong (the split in rel_spectral; empty where the record has none)
    *(f"{name}_{s}" for name in DIAGNOSTIC_FIGURES for s in ("mean", "max")),
    "diagnostics_note",  # from 0.9
]  # fmt: skip


def to_csv(report: RunReport) -> str:
    return csv_text(CSV_FIELDS, (_csv_row(report, r) for r in report.results))


def _csv_row(report: RunReport, r: Result) -> dict[str, Any]:
    """One record's CSV row: its figures, the input's scale and its environment."""
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
    row["phase"] = r.phase
    backward, exact_backward = time and time.backward_s, time and time.exact_backward_s
    row["backward_s_median"] = backward.median if backward else None
    row["backward_s_iqr"] = backward.iqr if backward else None
    row["exact_backward_s_median"] = exact_backward.median if exact_backward else None
    row["backward_speedup"] = time.backward_speedup if time else None
    row["exact_backward_s_extrapolated"] = exact_backward.extrapolated if exact_backward else None
    row["backward_peak_memory_bytes"] = backward.peak_memory_bytes if backward else None
    row["backward_note"] = time.backward_note if time else None
    found = r.diagnostics
    for name in DIAGNOSTIC_FIGURES:
        summary = found.figure(name) if found else None
        row[f"{name}_mean"] = None if summary is None else summary.mean
        row[f"{name}_max"] = None if summary is None else summary.max
    row["diagnostics_note"] = found.note if found else None
    return row


def _reference_spec(report: RunReport) -> str:
    """``full`` or ``rows:R``: the CSV's ``reference`` column."""
    ref = report.reference
    return f"rows:{ref.rows}" if ref.sampled else "full"


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
    verbose: bool = True,
    per_head: bool = False,
) -> None:
    """Write ``report`` to ``stream`` in one of ``REPORT_FORMATS`` (``colour``: ANSI styles in the
    table, for a terminal; ``verbose``: the resolved parameters under it, as ``--verbose``;
    ``per_head``: the table and Markdown end with each setting's worst heads, ``--per-head``; the
    JSON holds every head's figures already)."""
    if fmt == "json":
        stream.write(to_json(report) + "\n")
    elif fmt == "jsonl":
        stream.write(jsonl_header(report) + "\n")
        for part in report.layers:  # each layer's (and phase's) input and floors
            stream.write(jsonl_layer(part) + "\n")
        for record in report.results:
            stream.write(jsonl_result(record) + "\n")
        if report.pareto is not None:
            stream.write(jsonl_pareto(report.pareto) + "\n")
    elif fmt == "csv":
        stream.write(to_csv(report))
    elif fmt == "markdown":
        stream.write(to_markdown(report, columns, per_head))
    elif fmt == "table":
        console = table.console_for(stream, width, colour)
        render_table(report, console, columns, verbose)
        if per_head:
            from kdecli.experiments.compare.heads import worst_heads_table

            console.print()
            worst_heads_table(report, console)
    else:
        raise ValueError(fmt)
