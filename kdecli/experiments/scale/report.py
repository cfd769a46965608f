"""Render a ``ScaleReport``: one row per method × length, then the fitted exponents; or CSV, JSON.

The error shown is rel_spectral where the run had the full reference, else rel_frobenius from the
row sample (with its 95 % interval when the record has one); the column says which.  An exact time
extrapolated from a row sample is marked ``≈``.  The table fits the width and takes ``--columns``
as every table does (``kdecli.render.table``).  A decode document (n: cache length) times one
step, and adds the method's preparation of the cache and the speed-up of the step amortised over
the document's ``steps``.  A ``--target-error`` document is rendered by ``tolerable_report``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdecli.experiments.compare.records import Result
from kdecli.experiments.scale import tolerable_report
from kdecli.experiments.scale.records import ScaleReport
from kdecli.experiments.verdict import scale_verdict
from kdecli.records import clean
from kdecli.render import table
from kdecli.render.cells import MISSING, fmt_number, fmt_speedup, fmt_time
from kdecli.render.table import Column, Layout
from kdecli.render.writers import csv_text

FORMATS = ("table", "json", "csv", "markdown")


@dataclass(frozen=True)
class ScaleRow:
    """One method at one length: its time, exact attention's, and the error it reached."""

    method: str
    n: int
    status: str
    time_s: float | None
    exact_s: float | None
    exact_extrapolated: bool | None  # exact time scaled from a row sample (None: not timed)
    speedup: float | None
    metric: str  # rel_spectral, or rel_frobenius under a row sample
    error: float | None
    error_low: float | None
    error_high: float | None
    floor: float | None = None  # the mean-of-V floor of ``metric`` at this n
    prepare_s: float | None = None  # decode: the cache's one-off preparation
    amortised_speedup: float | None = None  # decode: exact step / (step + prepare/steps)


DECODE_FIELDS = ("prepare_s", "amortised_speedup")


def error_of(record: Result) -> tuple[str, float | None, tuple[float, float] | None]:
    """(metric, value, 95 % interval or None): rel_spectral when known, else rel_frobenius."""
    spectral = record.error("rel_spectral")
    if spectral is not None:
        return "rel_spectral", spectral, None
    summary = record.errors.get("rel_frobenius")
    interval = summary.interval if summary is not None else None
    bounds = None if interval is None or interval.low is None else (interval.low, interval.high)
    return "rel_frobenius", record.error("rel_frobenius"), bounds


def rows(report: ScaleReport) -> list[ScaleRow]:
    """One row per method × length (the first seed's record: it carries the job's timing)."""
    out = []
    for n, run in zip(report.lengths, report.runs):
        seen = set()
        for record in run.results:
            if record.method in seen:
                continue
            seen.add(record.method)
            metric, value, interval = error_of(record)
            time = record.time
            exact = time.exact_s if time else None
            out.append(
                ScaleRow(
                    method=record.method,
                    n=n,
                    status=record.status,
                    time_s=time.method_s.median if time and time.method_s else None,
                    exact_s=exact.median if exact else None,
                    exact_extrapolated=bool(exact.extrapolated) if exact else None,
                    speedup=time.speedup if time else None,
                    metric=metric,
                    error=value,
                    error_low=interval[0] if interval else None,
                    error_high=interval[1] if interval else None,
                    floor=run.floors.mean_floor(metric),
                    prepare_s=time.prepare_s.median if time and time.prepare_s else None,
                    amortised_speedup=time.amortised_speedup if time else None,
                )
            )
    return out


def _error_cell(row: ScaleRow) -> str:
    if row.error is None:
        return MISSING
    cell = f"{row.error:.4g}"
    if row.error_low is not None:
        cell += f" [{row.error_low:.3g}, {row.error_high:.3g}]"
    return cell + ("" if row.metric == "rel_spectral" else " (F, rows)")


def _exact_cell(row: ScaleRow) -> str:
    return ("≈ " if row.exact_extrapolated else "") + fmt_time(row.exact_s)


COLUMNS = (
    Column("method", "method", lambda row: row.method, "left"),
    Column("n", "n", lambda row: f"{row.n:,}"),
    Column("time", "time", lambda row: fmt_time(row.time_s)),
    Column("exact_time", "exact", _exact_cell),
    Column("speedup", "speed-up", lambda row: fmt_speedup(row.speedup)),
    Column("error", "error", _error_cell),
    Column("floor", "mean\nfloor", lambda row: fmt_number(row.floor, ".4g"), flat="mean floor"),
    Column("status", "status", lambda row: row.status, "left", wraps=True),
)
DECODE_COLUMNS = (
    Column("prepare", "prepare", lambda row: fmt_time(row.prepare_s)),
    Column("amortised", "amortised speed-up", lambda row: fmt_speedup(row.amortised_speedup)),
)
COLUMN_KEYS = tuple(c.key for c in COLUMNS + DECODE_COLUMNS)
LAYOUT = Layout(
    COLUMNS, ("method", "n", "time", "error", "floor", "status"), ("speedup", "exact_time"), 12
)
DECODE_LAYOUT = Layout(
    COLUMNS[:5] + DECODE_COLUMNS + COLUMNS[5:],
    ("method", "n", "time", "error", "floor", "status"),
    ("speedup", "prepare", "amortised", "exact_time"),
    12,
)


def layout_of(report: ScaleReport) -> Layout:
    return DECODE_LAYOUT if report.phase == "decode" else LAYOUT


def parse_columns(text: str | None) -> tuple[str, ...] | None:
    """``--columns a,b,c`` or ``all``."""
    return table.parse_columns(text, COLUMN_KEYS)


def title(report: ScaleReport) -> str:
    budget = "no budget" if report.budget is None else f"budget {report.budget}"
    if report.phase == "decode":
        return (
            f"decode step against the cache length n · {report.input} · {budget} · "
            f"{report.queries} quer{'y' if report.queries == 1 else 'ies'} per step, "
            f"preparation amortised over {report.steps} steps"
        )
    return f"time and error against n · {report.input} · {budget}"


def notes(report: ScaleReport) -> str:
    lines = ["≈: exact time extrapolated from a row sample (its cost is linear in n_q)"]
    lines.append(
        "mean floor: the error of answering every query with the mean of V; a method at or above "
        "it does no better (on gaussian synthetic data attention is nearly uniform, so the mean of V"
        " is close to exact attention)"
    )
    lines.append(
        "error: rel_spectral with the full reference; (F, rows): rel_frobenius from a row sample"
    )
    if report.interrupted:
        lines.append("interrupted: the lengths shown are those that finished")
    return " · ".join(lines)


def _fit_cells(report: ScaleReport) -> list[tuple[str, str, str, str]]:
    """(method, exponent, the lengths it is fitted on, note) for each fit."""
    cells = []
    for name, fit in report.fits.items():
        exponent = MISSING if fit.exponent is None else f"{fit.exponent:.2f}"
        span = f"{fit.points} lengths, {fit.n_min:,}–{fit.n_max:,}" if fit.points else MISSING
        cells.append((name, exponent, span, fit.note or ""))
    return cells


FIT_TITLE = "fitted exponent of time in n (log-log slope)"
FIT_HEADERS = (("method", "left"), ("exponent", "right"), ("from", "right"), ("note", "left"))


def _style(row: ScaleRow) -> str | None:
    return None if row.status == "ok" else "red"


def render_table(report: ScaleReport, console: Console, columns: Sequence[str] | None = None):
    table_rows = rows(report)
    choice = table.choose(layout_of(report), table_rows, console.width, columns)
    table.draw(console, title(report), choice, table_rows, _style)
    fits = Table(title=Text(FIT_TITLE), title_justify="left")
    for name, justify in FIT_HEADERS:
        fits.add_column(name, justify=justify, overflow="fold" if name == "note" else "ellipsis")
    for cells in _fit_cells(report):
        fits.add_row(*map(Text, cells))
    console.print(fits)
    console.print(scale_verdict(report).text(), highlight=False, markup=False)
    console.print(notes(report), highlight=False, markup=False)


def to_markdown(report: ScaleReport, columns: Sequence[str] | None = None) -> str:
    """The table and the fits as GitHub Markdown, with the notes."""
    lines = table.markdown_table(layout_of(report), rows(report), title(report), columns)
    lines += ["", f"**{FIT_TITLE}**", ""]
    fit_columns = [
        Column(name, name, lambda cells, i=i: cells[i], justify)
        for i, (name, justify) in enumerate(FIT_HEADERS)
    ]
    lines += table.markdown_rows(fit_columns, _fit_cells(report))
    lines += ["", scale_verdict(report).text(" ")]
    return "\n".join([*lines, "", notes(report)]) + "\n"


def to_csv(report: ScaleReport, *, header: bool = True) -> str:
    """One line per method × length, every field of ``ScaleRow``."""
    fields = [f.name for f in ScaleRow.__dataclass_fields__.values()]
    if report.phase != "decode":  # a prefill document's lines as before decode existed
        fields = [name for name in fields if name not in DECODE_FIELDS]
    lines = ({name: row[name] for name in fields} for row in map(asdict, rows(report)))
    return csv_text(fields, lines, header=header)


def render_text(
    report: ScaleReport,
    fmt: str,
    *,
    width: int | None = None,
    columns: Sequence[str] | None = None,
    colour: bool = False,
) -> str:
    """The report in one of ``FORMATS``, in one string (a file is written whole); a
    ``--target-error`` document in its own tables (``tolerable_report``; no ``--columns``)."""
    if report.tolerable is not None:
        return tolerable_report.render_text(report, fmt, width=width, colour=colour)
    if fmt == "json":
        doc = {**report.to_dict(), "summary": scale_verdict(report).to_dict()}
        return json.dumps(clean(doc), indent=2) + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt == "markdown":
        return to_markdown(report, columns)
    if fmt != "table":
        raise ValueError(fmt)
    buffer = io.StringIO()
    render_table(report, table.console_for(buffer, width, colour), columns)
    return buffer.getvalue()
