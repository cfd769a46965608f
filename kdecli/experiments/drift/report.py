"""Render a ``DriftReport``: a rich table that fits the terminal, CSV, or the JSON document.

One row per method × budget.  Each figure is shown as mean ± std over seeds with the ``mean``
baseline's value (the floor) in the column beside it; a method whose figure is no better than the
floor's is drawn yellow, one that could not run red with its reason.  The method, budget, the output
figure (KL for next-token models, cosine for embedding models) and its floor, time, speed-up and
status always show; the other columns join while they fit, as in ``kdecli.experiments.compare.report``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdecli.experiments.compare.report import FILE_WIDTH, fmt_time
from kdecli.experiments.drift.records import DriftReport, DriftResult, SeedStat, drift_json

FORMATS = ("table", "json", "csv")


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _stat(stat: SeedStat | None) -> str:
    if stat is None or stat.mean is None:
        return "—"
    if not stat.std:
        return f"{stat.mean:.3g}"
    return f"{stat.mean:.3g} ± {stat.std:.2g}"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    cell: Callable[[DriftResult, DriftResult | None], str]
    justify: str = "right"


def _figure(name: str) -> Callable[[DriftResult, DriftResult | None], str]:
    return lambda r, floor: _stat(getattr(r, name))


def _floor_of(name: str) -> Callable[[DriftResult, DriftResult | None], str]:
    return lambda r, floor: "—" if floor is None else _stat(getattr(floor, name))


def _speedup(r: DriftResult, floor) -> str:
    return f"{r.time.speedup:.2f}×" if r.time is not None and r.time.speedup else "—"


def _status(r: DriftResult, floor) -> str:
    return r.status if r.ok else f"{r.status}: {r.reason}"


def columns(output: str) -> list[Column]:
    """Every column for a next-token or an embedding model, in display order."""
    head = [
        Column("method", "method", lambda r, f: r.method, "left"),
        Column("budget", "budget", lambda r, f: "—" if r.budget is None else str(r.budget)),
    ]
    if output == "next-token":
        figures = [
            Column("kl", "KL(p‖p̂)\nmean ± std", _figure("kl")),
            Column("kl_floor", "KL\nmean floor", _floor_of("kl")),
            Column("top1", "top-1\nagreement", _figure("top1")),
            Column("top1_floor", "top-1\nmean floor", _floor_of("top1")),
            Column("ppl", "perplexity", _figure("perplexity")),
            Column("ppl_floor", "ppl\nmean floor", _floor_of("perplexity")),
        ]
    else:
        figures = [
            Column("cosine", "cosine\nmean ± std", _figure("cosine")),
            Column("cosine_floor", "cosine\nmean floor", _floor_of("cosine")),
        ]
    hidden = [
        Column("hidden_max", "hidden drift\nmax layer", lambda r, f: _num(r.hidden_max)),
        Column("hidden_max_floor", "max\nmean floor", lambda r, f: _num(f and f.hidden_max)),
        Column("hidden_last", "hidden drift\nlast layer", lambda r, f: _num(r.hidden_last)),
        Column("hidden_last_floor", "last\nmean floor", lambda r, f: _num(f and f.hidden_last)),
    ]
    tail = [
        Column("time", "forward", lambda r, f: fmt_time(r.time and r.time.method_median)),
        Column("speedup", "speed-up", _speedup),
        Column("status", "status", _status, "left"),
    ]
    return head + figures + hidden + tail


ALWAYS = (
    "method",
    "budget",
    "kl",
    "kl_floor",
    "cosine",
    "cosine_floor",
    "time",
    "speedup",
    "status",
)
OPTIONAL = (
    "hidden_max", "hidden_max_floor", "top1", "top1_floor", "ppl", "ppl_floor", "hidden_last",
    "hidden_last_floor",
)  # fmt: skip
STATUS_ROOM = 12


def _width(column: Column, report: DriftReport) -> int:
    cells = [column.cell(r, report.floor) for r in report.results]
    return max(cell_len(line) for text in (*cells, column.header) for line in text.split("\n"))


def choose(report: DriftReport, width: int) -> list[Column]:
    available = {c.key: c for c in columns(report.model.output)}
    widths = {key: _width(c, report) for key, c in available.items()}
    widths["status"] = min(widths["status"], STATUS_ROOM)
    chosen = [key for key in ALWAYS if key in available]
    for key in OPTIONAL:
        if key in available and 1 + sum(3 + widths[k] for k in [*chosen, key]) <= width:
            chosen.append(key)
    return [c for key, c in available.items() if key in chosen]


def title(report: DriftReport) -> str:
    m = report.model
    layers = ",".join(map(str, report.layers)) if report.layers else "none"
    exact = f" · exact ppl {report.exact.perplexity:.4g}" if report.exact.perplexity else ""
    if report.exact.time is not None:
        exact += f" · exact forward {fmt_time(report.exact.time.median)}"
    return (
        f"drift of {m.source} ({m.model_type}, {m.n_layers} layers, {m.output}"
        + (f", pooling {m.pooling}" if m.pooling else "")
        + f") · {report.chunks} × {report.tokens} tokens of {report.text} · layers {layers}{exact}"
    )


def _worse_than_floor(r: DriftResult, floor: DriftResult | None) -> bool:
    if floor is None or not r.ok or r.role == "baseline":
        return False
    if r.kl is not None and floor.kl is not None and None not in (r.kl.mean, floor.kl.mean):
        return r.kl.mean >= floor.kl.mean
    if r.cosine is not None and floor.cosine is not None:
        return None not in (r.cosine.mean, floor.cosine.mean) and r.cosine.mean <= floor.cosine.mean
    return False


def render_table(report: DriftReport, console: Console) -> None:
    chosen = choose(report, console.width)
    table = Table(title=Text(title(report)), title_justify="left")
    for column in chosen:
        wraps = column.key == "status"
        table.add_column(
            column.header,
            justify=column.justify,
            no_wrap=not wraps,
            overflow="fold" if wraps else "ignore",
            min_width=None if wraps else _width(column, report),
        )
    for r in report.results:
        style = "red" if not r.ok else ("yellow" if _worse_than_floor(r, report.floor) else None)
        table.add_row(*(Text(c.cell(r, report.floor)) for c in chosen), style=style)
    console.print(table)
    env = report.environment
    console.print(
        f"{env.label()}, {env.threads} threads · mean floor: the `mean` baseline in the same "
        "layers · hidden drift ‖Ĥ−H‖_F/‖H‖_F · time: one forward over one chunk, median",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


CSV_FIGURES = ("kl", "top1", "perplexity", "cosine")


def to_csv(report: DriftReport) -> str:
    """One row per method × budget: every figure's mean and std, its floor, the per-layer drift."""
    layers = report.model.n_layers
    fields = ["method", "budget", "status", "reason"]
    for name in CSV_FIGURES:
        fields += [f"{name}_mean", f"{name}_std", f"{name}_floor"]
    fields += [f"hidden_l{i}" for i in range(layers)] + [
        f"hidden_l{i}_floor" for i in range(layers)
    ]
    fields += ["time_s", "exact_time_s", "speedup"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    floor = report.floor
    for r in report.results:
        row = {"method": r.method, "budget": r.budget, "status": r.status, "reason": r.reason}
        for name in CSV_FIGURES:
            stat, base = getattr(r, name), floor and getattr(floor, name)
            row[f"{name}_mean"] = stat and stat.mean
            row[f"{name}_std"] = stat and stat.std
            row[f"{name}_floor"] = base and base.mean
        for i in range(layers):
            row[f"hidden_l{i}"] = r.hidden[i].mean if i < len(r.hidden) else None
            has = floor is not None and i < len(floor.hidden)
            row[f"hidden_l{i}_floor"] = floor.hidden[i].mean if has else None
        if r.time is not None:
            row.update(
                time_s=r.time.method_median,
                exact_time_s=r.time.exact_median,
                speedup=r.time.speedup,
            )
        writer.writerow(row)
    return buffer.getvalue()


def render_text(report: DriftReport, fmt: str, *, width: int | None = None, colour=False) -> str:
    """The report as ``table``, ``json`` or ``csv``, in one string (a file is written whole)."""
    if fmt == "json":
        return drift_json(report) + "\n"
    if fmt == "csv":
        return to_csv(report)
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width or FILE_WIDTH, soft_wrap=False, force_terminal=colour or None
    )
    render_table(report, console)
    return buffer.getvalue()
