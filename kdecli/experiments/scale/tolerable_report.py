"""Render a ``scale --target-error`` document: the smallest budget meeting E, n across, methods
down; the errors it measured; the verdict; or CSV (one line per point measured), JSON.

A cell is the smallest budget of the grid meeting E at that length and its density budget / n:
``≤ 16`` when the grid's smallest budget meets E (the tolerable budget may be smaller), ``none``
when even the grid's largest misses E, ``!`` when the measured errors do not fall as the budget
grows (the bisection's assumption).

The verdict (``TolerableVerdict``, the JSON's ``summary``) says, per method, how its tolerable
density moves from the shortest to the longest length where it met E ("longer sequences tolerate
more sparsity" when it falls), and which method is the sparsest meeting E at the longest length.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdecli.experiments.scale.records import ScaleReport
from kdecli.experiments.scale.tolerable_records import Tolerable, TolerableSearch
from kdecli.records import Record, clean
from kdecli.render import table
from kdecli.render.cells import MISSING
from kdecli.render.writers import csv_text

CSV_FIELDS = (
    *("n", "method", "budget", "density", "status", "error", "worst_head", "meets"),
    *("keys_per_query", "measured_density", "mass_recall", "smallest", "reason"),
)


@dataclass(frozen=True)
class Trend(Record):
    """A method's tolerable density at the shortest and the longest length where it met E;
    ``direction``: "sparser" (it never rises with n, and falls), "denser", "same", "varies" (it
    rises and falls), "below the grid" (a length's answer is the grid's smallest budget: the
    trend is not known), "only at n" (only the budget n, every key, meets E), or "never"."""

    method: str
    direction: str
    n_first: int | None = None
    density_first: float | None = None
    n_last: int | None = None
    density_last: float | None = None
    missed: tuple[int, ...] = ()  # the lengths where it met E at no budget of the grid


@dataclass(frozen=True)
class TolerableVerdict(Record):
    """The sentences under the table and the facts they rest on."""

    sentences: tuple[str, ...]
    target_error: float
    trends: tuple[Trend, ...] = ()
    sparsest: str | None = None  # the method with the smallest density meeting E at the last n
    sparsest_n: int | None = None

    def text(self, sep: str = "\n") -> str:
        return sep.join(self.sentences)


def _percent(density: float | None) -> str:
    if density is None:
        return MISSING
    return f"{100 * density:.3g} %"


def _trend(record: TolerableSearch, method: str, lengths: list[int]) -> Trend:
    answers = [a for n in lengths if (a := record.answer(method, n)) is not None]
    met = [a for a in answers if a.budget is not None]
    missed = tuple(a.n for a in answers if a.budget is None)
    if not met:
        return Trend(method, "never", missed=missed)
    first, last = met[0], met[-1]
    steps = [b.density - a.density for a, b in zip(met, met[1:])]
    if all(a.budget == a.n for a in met):
        direction = "only at n"
    elif any(a.below_grid for a in met):
        direction = "below the grid"
    elif all(step == 0 for step in steps):
        direction = "same"
    elif all(step <= 0 for step in steps):
        direction = "sparser"
    elif all(step >= 0 for step in steps):
        direction = "denser"
    else:
        direction = "varies"
    return Trend(method, direction, first.n, first.density, last.n, last.density, missed)


def _span(trend: Trend) -> str:
    return (
        f"{_percent(trend.density_first)} at n = {trend.n_first:,} → "
        f"{_percent(trend.density_last)} at n = {trend.n_last:,}"
    )


def _densities(record: TolerableSearch, method: str, lengths: list[int]) -> str:
    answers = [a for n in lengths if (a := record.answer(method, n)) and a.budget is not None]
    return " → ".join(_percent(a.density) for a in answers)


def verdict(report: ScaleReport) -> TolerableVerdict:
    """Per method the direction of its tolerable density with n, and the sparsest at the
    longest length (module docstring)."""
    record = report.tolerable
    target = record.target_error
    lengths = report.lengths
    trends = tuple(_trend(record, m, lengths) for m in record.methods)
    groups: dict[str, list[Trend]] = {}
    for trend in trends:
        groups.setdefault(trend.direction, []).append(trend)
    what = f"{record.metric} ≤ {target:g}" + (", every head" if record.criterion != "mean" else "")
    parts = []
    if "sparser" in groups:
        parts.append("longer sequences tolerate more sparsity for "
                     + ", ".join(f"{t.method} ({_span(t)})" for t in groups["sparser"]))  # fmt: skip
    if "denser" in groups:
        parts.append("a longer sequence needs a larger share of its keys for "
                     + ", ".join(f"{t.method} ({_span(t)})" for t in groups["denser"]))  # fmt: skip
    if "same" in groups:
        parts.append("the same share at every length it meets E for "
                     + ", ".join(t.method for t in groups["same"]))  # fmt: skip
    if "varies" in groups:
        parts.append("no single direction for "
                     + ", ".join(f"{t.method} ({_densities(record, t.method, lengths)})"
                                 for t in groups["varies"]))  # fmt: skip
    if "only at n" in groups:
        parts.append("only the full budget (n keys) meets E for "
                     + ", ".join(t.method for t in groups["only at n"]))  # fmt: skip
    if "below the grid" in groups:
        parts.append("the grid's smallest budget already meets E (give smaller --budgets) for "
                     + ", ".join(t.method for t in groups["below the grid"]))  # fmt: skip
    if "never" in groups:
        parts.append("no budget of the grid meets E at any length for "
                     + ", ".join(t.method for t in groups["never"]))  # fmt: skip
    sentences = [f"At {what}: " + "; ".join(parts) + "." if parts else f"At {what}: no answer."]
    sparsest, last_n = None, report.lengths[-1] if report.lengths else None
    if last_n is not None:
        met = [a for m in record.methods if (a := record.answer(m, last_n)) and a.budget]
        if met:
            best = min(met, key=lambda a: (a.budget, record.methods.index(a.method)))
            sparsest = best.method
            bound = "≤ " if best.below_grid else ""
            sentences.append(
                f"At n = {last_n:,} the sparsest meeting E is {best.method}: budget {bound}"
                f"{best.budget:,} ({bound}{_percent(best.density)} of the keys)."
            )
    return TolerableVerdict(tuple(sentences), target, trends, sparsest, last_n)


def budget_cell(answer: Tolerable | None) -> str:
    """``64 · 6.25 %``, ``≤ 16 · 1.56 %``, ``none (> 1,024)``; ``!``: not monotone."""
    if answer is None:
        return MISSING
    if answer.budget is None:
        cell = f"none (> {answer.largest:,})" + (" failed" if answer.reason else "")
    else:
        bound = "≤ " if answer.below_grid else ""
        cell = f"{bound}{answer.budget:,} · {bound}{_percent(answer.density)}"
    return cell + ("" if answer.monotone else " !")


def probes_cell(record: TolerableSearch, method: str, n: int, sep: str = "\n") -> str:
    """Every point measured: ``budget: error`` with ✓ where it meets E."""
    lines = []
    for p in record.probes_of(method, n):
        figure = p.worst_head if record.criterion != "mean" else p.error
        value = p.status if figure is None else f"{figure:.3g}"
        lines.append(f"{p.budget:,}: {value}" + (" ✓" if p.meets else ""))
    return sep.join(lines) or MISSING


def title(report: ScaleReport) -> str:
    record = report.tolerable
    heads = "every head" if record.criterion != "mean" else "mean over heads"
    return (
        f"smallest budget with {record.metric} ≤ {record.target_error:g} ({heads}) against n · "
        f"{report.input}"
    )


def notes(report: ScaleReport) -> str:
    record = report.tolerable
    first = record.lengths[0] if record.lengths else None
    if report.input.startswith("synthetic:"):
        where = "n: the input drawn at n"
    else:
        where = "n: the first n positions of the input (queries and keys)"
    if report.phase == "decode":
        queries = first.input.queries if first is not None else None
        where += f"; decode: the last {queries or 'M'} queries, each over its own prefix"
    elif first is not None and first.input.causal:
        where += "; causal prefill: query i reads keys 0..i"
    search = (
        "bisection on the grid (it assumes the error falls as the budget grows; !: the points "
        "measured say otherwise, rerun with --search all)"
        if record.search == "bisect"
        else "every budget of the grid measured"
    )
    grid = "powers of two from 16 to n, and n" if record.grid is None else "--budgets"
    lines = [
        where,
        f"density: budget / n; ≤: the grid's smallest budget meets E; none (> m): even the "
        f"grid's largest, m, misses it; grid: {grid}; search: {search}",
        "error: mean over seeds (randomized methods) of the mean over batch×head slices"
        + ("; every head: the largest slice must meet E" if record.criterion != "mean" else ""),
        "mean floor (answering every query with the mean of V): "
        + ", ".join(f"{i.floor:.3g} at n = {i.n:,}" for i in record.lengths if i.floor is not None),
        "no time is measured under --target-error (scale without it times each method)",
    ]
    sampled = [info for info in record.lengths if info.reference.sampled]
    if sampled:
        lines.append(
            "rel_frobenius estimated from a row sample (no rel_spectral) at n = "
            + ", ".join(f"{info.n:,}" for info in sampled)
        )
    failed = [a for a in record.budgets if a.reason]
    lines += [
        f"{a.method} at n = {a.n:,} failed at budget {a.largest:,}: {a.reason}" for a in failed
    ]
    if report.interrupted:
        lines.append("interrupted: the lengths shown are those that finished")
    return " · ".join(lines)


def _table(report: ScaleReport, cell, heading: str) -> Table:
    out = Table(title=Text(heading), title_justify="left")
    out.add_column("method", justify="left")
    for n in report.lengths:
        out.add_column(f"n = {n:,}", justify="right", overflow="fold")
    for method in report.tolerable.methods:
        out.add_row(Text(method), *(Text(cell(method, n)) for n in report.lengths))
    return out


def render_table(report: ScaleReport, console: Console) -> None:
    record = report.tolerable
    console.print(_table(report, lambda m, n: budget_cell(record.answer(m, n)), title(report)))
    console.print(_table(report, lambda m, n: probes_cell(record, m, n), "errors measured"))
    console.print(verdict(report).text(), highlight=False, markup=False)
    console.print(notes(report), highlight=False, markup=False)


def to_markdown(report: ScaleReport) -> str:
    record = report.tolerable
    head = ["method", *(f"n = {n:,}" for n in report.lengths)]

    def grid(cell) -> list[str]:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in record.methods:
            lines.append("| " + " | ".join([m, *(cell(m, n) for n in report.lengths)]) + " |")
        return lines

    lines = [f"**{title(report)}**", "", *grid(lambda m, n: budget_cell(record.answer(m, n)))]
    lines += ["", "**errors measured**", ""]
    lines += grid(lambda m, n: probes_cell(record, m, n, "; "))
    lines += ["", verdict(report).text(" ")]
    return "\n".join([*lines, "", notes(report)]) + "\n"


def to_csv(report: ScaleReport, *, header: bool = True) -> str:
    """One line per point measured: ``density`` is budget / n, ``measured_density`` the kept
    keys over the allowed (with --diagnostics); ``smallest``: it is the answer at its length."""
    record = report.tolerable
    lines = []
    for p in record.probes:
        answer = record.answer(p.method, p.n)
        line = {name: getattr(p, name, None) for name in CSV_FIELDS}
        line["density"] = p.budget / p.n
        line["measured_density"] = p.density
        line["smallest"] = answer is not None and answer.budget == p.budget
        lines.append(line)
    return csv_text(CSV_FIELDS, lines, header=header)


def render_text(
    report: ScaleReport, fmt: str, *, width: int | None = None, colour: bool = False
) -> str:
    """The document in one of the scale formats, in one string."""
    if fmt == "json":
        doc = {**report.to_dict(), "summary": verdict(report).to_dict()}
        return json.dumps(clean(doc), indent=2) + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt == "markdown":
        return to_markdown(report)
    if fmt != "table":
        raise ValueError(fmt)
    buffer = io.StringIO()
    render_table(report, table.console_for(buffer, width, colour))
    return buffer.getvalue()
