"""Render a ``DriftReport``: a table that fits the terminal (rich or Markdown), CSV, or its JSON.

One row per method × budget.  Each figure is shown as mean ± std over seeds with the ``mean``
baseline's value (the floor) in the column beside it; a method whose figure is no better than the
floor's is drawn yellow, one that could not run red with its reason.  The method, budget, the output
figure (KL for next-token models, cosine for embedding models) and its floor, time, speed-up and
status always show; the other columns join while they fit, and ``--columns`` chooses, as for every
table (``kdecli.render.table``).

A ``--generate`` document has its own columns: the first divergence (median over prompts; how many
generations never diverged), token agreement, and the teacher-forced KL, top-1 agreement and
perplexity of the exact continuation, each beside its floor, and one decode step's time.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kdecli.experiments.drift.records import DriftReport, DriftResult
from kdecli.experiments.verdict import drift_verdict
from kdecli.measure.figures import SeedStats
from kdecli.render import table
from kdecli.render.cells import MISSING, fmt_number, fmt_speedup, fmt_time
from kdecli.render.table import Column, Layout
from kdecli.render.writers import csv_text

FORMATS = ("table", "json", "csv", "markdown")


@dataclass(frozen=True)
class DriftRow:
    """A result beside the floor it is read against (the ``mean`` baseline in the same layers)."""

    result: DriftResult
    floor: DriftResult | None


def _stat(stat: SeedStats | None) -> str:
    if stat is None or stat.mean is None:
        return MISSING
    if not stat.std:
        return f"{stat.mean:.3g}"
    return f"{stat.mean:.3g} ± {stat.std:.2g}"


def _figure(name: str) -> Callable[[DriftRow], str]:
    return lambda row: _stat(getattr(row.result, name))


def _floor_of(name: str) -> Callable[[DriftRow], str]:
    return lambda row: MISSING if row.floor is None else _stat(getattr(row.floor, name))


def _hidden(name: str, floor: bool = False) -> Callable[[DriftRow], str]:
    def cell(row: DriftRow) -> str:
        of = row.floor if floor else row.result
        return fmt_number(None if of is None else getattr(of, name))

    return cell


def _speedup(r: DriftResult) -> str:
    if r.role == "reference":
        return MISSING  # exact attention against itself is 1× by definition
    return fmt_speedup(r.time and r.time.speedup, ".2f")


def _status(row: DriftRow) -> str:
    r = row.result
    return r.status if r.ok else f"{r.status}: {r.reason}"


HEAD = (
    Column("method", "method", lambda row: row.result.method, "left"),
    Column("budget", "budget", lambda row: fmt_number(row.result.budget, "d")),
)
NEXT_TOKEN = (
    Column("kl", "KL(p‖p̂)\nmean ± std", _figure("kl")),
    Column("kl_floor", "KL\nmean floor", _floor_of("kl")),
    Column("top1", "top-1\nagreement", _figure("top1")),
    Column("top1_floor", "top-1\nmean floor", _floor_of("top1")),
    Column("ppl", "perplexity", _figure("perplexity")),
    Column("ppl_floor", "ppl\nmean floor", _floor_of("perplexity")),
)
EMBEDDING = (
    Column("cosine", "cosine\nmean ± std", _figure("cosine")),
    Column("cosine_floor", "cosine\nmean floor", _floor_of("cosine")),
)
TAIL = (
    Column("hidden_max", "hidden drift\nmax layer", _hidden("hidden_max")),
    Column("hidden_max_floor", "max\nmean floor", _hidden("hidden_max", floor=True)),
    Column("hidden_last", "hidden drift\nlast layer", _hidden("hidden_last")),
    Column("hidden_last_floor", "last\nmean floor", _hidden("hidden_last", floor=True)),
    Column("time", "forward", lambda row: fmt_time(row.result.time and row.result.time.method_median)),
    Column("speedup", "speed-up", lambda row: _speedup(row.result)),
    Column("status", "status", _status, "left", wraps=True),
)  # fmt: skip


def _generation(name: str, floor: bool = False) -> Callable[[DriftRow], str]:
    def cell(row: DriftRow) -> str:
        of = row.floor if floor else row.result
        figures = None if of is None else of.generation
        return _stat(None if figures is None else getattr(figures, name))

    return cell


def _never(row: DriftRow) -> str:
    g = row.result.generation
    return MISSING if g is None else f"{g.never_diverged}/{g.generations}"


GENERATION = (
    Column("first_divergence", "first\ndivergence", _generation("first_divergence")),
    Column("first_divergence_floor", "first div.\nmean floor", _generation("first_divergence", True)),
    Column("never_diverged", "never\ndiverged", _never),
    Column("token_agreement", "token\nagreement", _generation("token_agreement")),
    Column("token_agreement_floor", "tokens\nmean floor", _generation("token_agreement", True)),
    Column("gen_kl", "KL(p‖p̂)\nforced", _generation("kl")),
    Column("gen_kl_floor", "KL\nmean floor", _generation("kl", True)),
    Column("top1_agreement", "top-1\nforced", _generation("top1_agreement")),
    Column("top1_agreement_floor", "top-1\nmean floor", _generation("top1_agreement", True)),
    Column("gen_ppl", "ppl of exact\ncontinuation", _generation("perplexity")),
    Column("gen_ppl_floor", "ppl\nmean floor", _generation("perplexity", True)),
    Column("step_time", "decode\nstep", lambda row: fmt_time(row.result.time and row.result.time.method_median)),
    Column("speedup", "speed-up", lambda row: _speedup(row.result)),
    Column("status", "status", _status, "left", wraps=True),
)  # fmt: skip
GENERATION_ALWAYS = ("method", "budget", "first_divergence", "token_agreement", "gen_kl", "status")
GENERATION_OPTIONAL = (
    "gen_kl_floor", "top1_agreement", "first_divergence_floor", "token_agreement_floor",
    "never_diverged", "step_time", "speedup", "top1_agreement_floor", "gen_ppl", "gen_ppl_floor",
)  # fmt: skip
# Every column a drift table has, for a next-token or an embedding model, or a generation
# (``--columns`` names).
COLUMN_KEYS = tuple(
    dict.fromkeys(c.key for c in (*HEAD, *NEXT_TOKEN, *EMBEDDING, *TAIL, *GENERATION))
)
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


def layout(output: str, generation: bool = False) -> Layout[DriftRow]:
    """The table of a next-token model (KL, top-1, perplexity), an embedding model (cosine), or
    a ``--generate`` run."""
    if generation:
        return Layout((*HEAD, *GENERATION), GENERATION_ALWAYS, GENERATION_OPTIONAL, STATUS_ROOM)
    figures = NEXT_TOKEN if output == "next-token" else EMBEDDING
    return Layout((*HEAD, *figures, *TAIL), ALWAYS, OPTIONAL, STATUS_ROOM)


def parse_columns(text: str | None) -> tuple[str, ...] | None:
    """``--columns a,b,c`` or ``all`` (of a next-token or an embedding model's table)."""
    return table.parse_columns(text, COLUMN_KEYS)


def rows(report: DriftReport) -> list[DriftRow]:
    return [DriftRow(r, report.floor) for r in report.results]


def title(report: DriftReport) -> str:
    m = report.model
    layers = ",".join(map(str, report.layers)) if report.layers else "none"
    exact = f" · exact ppl {report.exact.perplexity:.4g}" if report.exact.perplexity else ""
    step = "forward" if report.generate is None else "decode step"
    if report.exact.time is not None:
        exact += f" · exact {step} {fmt_time(report.exact.time.median)}"
    if report.generate is not None:
        exact = (
            f" · greedy generation of {report.generate} tokens, method in {report.phase}"
            + exact.replace("exact ppl", "exact ppl of its continuation")
        )
    return (
        f"drift of {m.source} ({m.model_type}, {m.n_layers} layers, {m.output}"
        + (f", pooling {m.pooling}" if m.pooling else "")
        + f") · {report.chunks} × {report.tokens} tokens of {report.text} · layers {layers}{exact}"
    )


def footer(report: DriftReport) -> str:
    env = report.environment
    if report.generate is not None:
        return (
            f"{env.label()}, {env.threads} threads · mean floor: the `mean` baseline in the same "
            "layers and phases · first divergence: median over prompts of the first step whose "
            f"token differs (0-based; a generation that never differs counts as {report.generate})"
            " · KL, top-1, ppl: teacher-forced on the exact generation, step by step through the "
            "KV cache · decode step: median wall time of one step's forward"
        )
    return (
        f"{env.label()}, {env.threads} threads · mean floor: the `mean` baseline in the same "
        "layers · hidden drift ‖Ĥ−H‖_F/‖H‖_F · time: one forward over one chunk, median"
    )


def worse_than_floor(r: DriftResult, floor: DriftResult | None) -> bool:
    """Is the output figure no better than the ``mean`` baseline's (KL as high, cosine as low)?"""
    if floor is None or not r.ok or r.role == "baseline":
        return False
    if r.generation is not None and floor.generation is not None:
        mine, base = r.generation.kl.mean, floor.generation.kl.mean
        return None not in (mine, base) and mine >= base
    if r.kl is not None and floor.kl is not None and None not in (r.kl.mean, floor.kl.mean):
        return r.kl.mean >= floor.kl.mean
    if r.cosine is not None and floor.cosine is not None:
        return None not in (r.cosine.mean, floor.cosine.mean) and r.cosine.mean <= floor.cosine.mean
    return False


def _style(row: DriftRow) -> str | None:
    if not row.result.ok:
        return "red"
    return "yellow" if worse_than_floor(row.result, row.floor) else None


def render_table(report: DriftReport, console, columns: Sequence[str] | None = None) -> None:
    layout_ = layout(report.model.output, report.generate is not None)
    table_rows = rows(report)
    choice = table.choose(layout_, table_rows, console.width, columns)
    table.draw(console, title(report), choice, table_rows, _style)
    console.print(drift_verdict(report).text(), highlight=False, markup=False)
    console.print(footer(report), highlight=False, markup=False, soft_wrap=True)


def to_markdown(report: DriftReport, columns: Sequence[str] | None = None) -> str:
    """The table as GitHub Markdown (every column unless ``columns`` chooses), with its caption."""
    layout_ = layout(report.model.output, report.generate is not None)
    lines = table.markdown_table(layout_, rows(report), title(report), columns)
    lines += ["", drift_verdict(report).text(" ")]
    return "\n".join([*lines, "", footer(report)]) + "\n"


CSV_FIGURES = ("kl", "top1", "perplexity", "cosine")


GENERATION_FIGURES = (
    "first_divergence", "token_agreement", "kl", "top1_agreement", "perplexity"
)  # fmt: skip


def _generation_csv(report: DriftReport, header: bool) -> str:
    """A ``--generate`` document: every generation figure's mean, std and floor (the per-step
    curves are in the JSON)."""
    fields = ["method", "budget", "status", "reason", "steps", "never_diverged", "generations"]
    for name in GENERATION_FIGURES:
        fields += [f"{name}_mean", f"{name}_std", f"{name}_floor"]
    fields += ["step_time_s", "exact_step_time_s", "speedup"]

    def row(r: DriftResult) -> dict:
        out = {"method": r.method, "budget": r.budget, "status": r.status, "reason": r.reason}
        g, base = r.generation, report.floor and report.floor.generation
        if g is not None:
            out.update(steps=g.steps, never_diverged=g.never_diverged, generations=g.generations)
            for name in GENERATION_FIGURES:
                stat = getattr(g, name)
                out[f"{name}_mean"], out[f"{name}_std"] = stat.mean, stat.std
                out[f"{name}_floor"] = base and getattr(base, name).mean
        if r.time is not None:
            out.update(
                step_time_s=r.time.method_median,
                exact_step_time_s=r.time.exact_median,
                speedup=r.time.speedup,
            )
        return out

    return csv_text(fields, (row(r) for r in report.results), header=header, finite=False)


def to_csv(report: DriftReport, *, header: bool = True) -> str:
    """One row per method × budget: every figure's mean and std, its floor, the per-layer drift."""
    if report.generate is not None:
        return _generation_csv(report, header)
    layers = report.model.n_layers
    fields = ["method", "budget", "status", "reason"]
    for name in CSV_FIGURES:
        fields += [f"{name}_mean", f"{name}_std", f"{name}_floor"]
    fields += [f"hidden_l{i}" for i in range(layers)] + [
        f"hidden_l{i}_floor" for i in range(layers)
    ]
    fields += ["time_s", "exact_time_s", "speedup"]
    return csv_text(
        fields, (_csv_row(r, report.floor, layers) for r in report.results), header=header,
        finite=False,
    )  # fmt: skip


def _csv_row(r: DriftResult, floor: DriftResult | None, layers: int) -> dict:
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
            time_s=r.time.method_median, exact_time_s=r.time.exact_median, speedup=r.time.speedup
        )
    return row


def render_text(
    report: DriftReport,
    fmt: str,
    *,
    width: int | None = None,
    columns: Sequence[str] | None = None,
    colour: bool = False,
) -> str:
    """The report in one of ``FORMATS``, in one string (a file is written whole)."""
    if fmt == "json":
        doc = {**report.to_dict(), "summary": drift_verdict(report).to_dict()}
        return json.dumps(doc, indent=2, allow_nan=False) + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt == "markdown":
        return to_markdown(report, columns)
    if fmt != "table":
        raise ValueError(fmt)
    buffer = io.StringIO()
    render_table(report, table.console_for(buffer, width, colour), columns)
    return buffer.getvalue()
