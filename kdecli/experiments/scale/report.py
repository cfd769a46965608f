"""Render a ``ScaleReport``: one row per method × length, then the fitted exponents; or CSV, JSON.

The error shown is rel_spectral where the run had the full reference, else rel_frobenius from the
row sample (with its 95 % interval when the record has one); the column says which.  An exact time
extrapolated from a row sample is marked ``≈``.
"""

from __future__ import annotations

import csv
import io
import json

from rich.console import Console
from rich.table import Table

from kdecli.experiments.compare.records import Result, clean
from kdecli.experiments.compare.report import FILE_WIDTH, fmt_time
from kdecli.experiments.scale.run import ScaleReport, exact_extrapolated

FORMATS = ("table", "json", "csv")


def error_of(record: Result) -> tuple[str, float | None, tuple[float, float] | None]:
    """(metric, value, 95 % interval or None): rel_spectral when known, else rel_frobenius."""
    spectral = record.error("rel_spectral")
    if spectral is not None:
        return "rel_spectral", spectral, None
    summary = record.errors.get("rel_frobenius")
    interval = summary.interval if summary is not None else None
    bounds = None if interval is None or interval.low is None else (interval.low, interval.high)
    return "rel_frobenius", record.error("rel_frobenius"), bounds


def rows(report: ScaleReport) -> list[dict]:
    out = []
    for n, run in zip(report.lengths, report.runs):
        seen = set()
        for record in run.results:
            if record.method in seen:  # the first seed's record carries the job's timing
                continue
            seen.add(record.method)
            metric, value, interval = error_of(record)
            time = record.time
            exact_s = time.exact_s.median if time and time.exact_s else None
            out.append(
                {
                    "method": record.method,
                    "n": n,
                    "status": record.status,
                    "time_s": time.method_s.median if time and time.method_s else None,
                    "exact_s": exact_s,
                    "exact_extrapolated": exact_extrapolated(record) if exact_s else None,
                    "speedup": time.speedup if time else None,
                    "metric": metric,
                    "error": value,
                    "error_low": interval[0] if interval else None,
                    "error_high": interval[1] if interval else None,
                }
            )
    return out


def render_text(report: ScaleReport, fmt: str, *, width: int | None = None, colour: bool = False):
    if fmt == "json":
        return json.dumps(clean(report.to_dict()), indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        table_rows = rows(report)
        writer = csv.DictWriter(buffer, fieldnames=list(table_rows[0]) if table_rows else ["n"])
        writer.writeheader()
        writer.writerows(table_rows)
        return buffer.getvalue()
    return _table(report, width, colour)


def _error_cell(row: dict) -> str:
    if row["error"] is None:
        return "—"
    cell = f"{row['error']:.4g}"
    if row["error_low"] is not None:
        cell += f" [{row['error_low']:.3g}, {row['error_high']:.3g}]"
    return cell + ("" if row["metric"] == "rel_spectral" else " (F, rows)")


def _table(report: ScaleReport, width: int | None, colour: bool) -> str:
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width or FILE_WIDTH,
        no_color=not colour,
        highlight=False,
        soft_wrap=False,
    )
    budget = "no budget" if report.budget is None else f"budget {report.budget}"
    table = Table(
        title=f"time and error against n · {report.input} · {budget}", title_justify="left"
    )
    for name, justify in (
        ("method", "left"),
        ("n", "right"),
        ("time", "right"),
        ("exact", "right"),
        ("speed-up", "right"),
        ("error", "right"),
        ("status", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")
    for row in rows(report):
        exact = fmt_time(row["exact_s"])
        if row["exact_extrapolated"]:
            exact = "≈ " + exact
        speedup = f"{row['speedup']:.1f}×" if row["speedup"] else "—"
        table.add_row(
            row["method"],
            f"{row['n']:,}",
            fmt_time(row["time_s"]),
            exact,
            speedup,
            _error_cell(row),
            row["status"],
        )
    console.print(table)
    fits = Table(title="fitted exponent of time in n (log-log slope)", title_justify="left")
    for name, justify in (("method", "left"), ("exponent", "right"), ("from", "right")):
        fits.add_column(name, justify=justify)
    fits.add_column("note", overflow="fold")
    for name, fit in report.fits.items():
        exponent = "—" if fit.exponent is None else f"{fit.exponent:.2f}"
        span = f"{fit.points} lengths, {fit.n_min:,}–{fit.n_max:,}" if fit.points else "—"
        fits.add_row(name, exponent, span, fit.note or "")
    console.print(fits)
    notes = ["≈: exact time extrapolated from a row sample (its cost is linear in n_q)"]
    notes.append(
        "error: rel_spectral with the full reference; (F, rows): rel_frobenius from a row sample"
    )
    if report.interrupted:
        notes.append("interrupted: the lengths shown are those that finished")
    console.print(" · ".join(notes))
    return buffer.getvalue()
