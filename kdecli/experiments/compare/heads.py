"""Per head: what a mean over heads hides — the worst heads of each setting, and the cheapest
setting that every head meets.

Every record keeps each metric per batch×head *slice* (``Summary.per_slice``): slices flatten
(b, h) in order, so slice s of an input with H heads is batch s // H, head s % H.  Here a *head*
is one slice of one layer, and its figure is the mean over the setting's seeds of that slice's
value (a non-finite or null slice counts as +inf).  Then

    mean over heads  =  the setting's seed-mean (the compare table's figure),

since each record's ``mean`` is the mean of its slices, and over the layers of a capture (equal
head counts) the mean over every head is the mean over layers.  A setting here is one method ×
budget × parameters × phase *across* layers: a head of layer 3 and a head of layer 0 compete.

``worst_heads`` lists each setting's heads, ``worst_heads_table`` draws the worst few beside the
mean (and a result's diagnostics — density, mass recall, selection and estimation error, lse
error — at those heads, where the run measured them), and ``cheapest_every_head`` is
``--target-error E --every-head``: the cheapest setting whose worst head (over every layer) meets
E, not its mean.  The figures are in the JSON already (``errors.*.per_slice``); nothing here is
written to a document but the Pareto pick.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from kdecli.experiments.compare.aggregate import Setting, group_settings, primary_metric
from kdecli.experiments.compare.pareto import cheapest_of
from kdecli.experiments.compare.records import Pareto, Result, RunReport
from kdecli.measure.figures import DIAGNOSTIC_FIGURES, SeedStats, Shape, Summary
from kdecli.records import Record, json_field
from kdecli.render import table
from kdecli.render.cells import MISSING
from kdecli.render.table import Column, Layout

WORST = 3  # heads listed per setting
# the diagnostics' short column names (any other figure keeps its own name)
SHORT_NAMES = {
    "density": "density",
    "mass_recall": "recall",
    "selection_error": "sel_err",
    "estimation_error": "est_err",
    "lse_error": "lse_err",
}


def slice_position(shape: Shape, index: int) -> tuple[int, int]:
    """Slice ``index`` of an input of ``shape`` as (batch, head)."""
    return divmod(index, shape.h)


@dataclass(frozen=True)
class Head(Record):
    """One head of one layer: its figure of the setting's metric (mean over seeds; inf where a
    slice was not finite), the head's own mean-of-V floor, and, where the result has them, its
    diagnostics."""

    layer: int | None
    batch: int
    head: int
    value: float
    floor: float | None = None
    diagnostics: dict[str, float | None] = json_field(default_factory=dict, omit="falsy")

    @property
    def label(self) -> str:
        """``L3 b0 h5`` (``b0 h5`` without layers)."""
        return ("" if self.layer is None else f"L{self.layer} ") + f"b{self.batch} h{self.head}"


@dataclass(frozen=True)
class HeadProfile(Record):
    """One setting (method × budget × parameters × phase, across layers): every head's figure."""

    method: str
    budget: int | None
    params: dict[str, Any]
    role: str
    phase: str
    metric: str
    heads: tuple[Head, ...]

    @property
    def mean(self) -> float:
        """The mean over every head: the setting's seed-mean (mean over layers too)."""
        values = [h.value for h in self.heads]
        return statistics.fmean(values) if all(map(math.isfinite, values)) else math.inf

    @property
    def max(self) -> float:
        return max(h.value for h in self.heads)

    def worst(self, count: int = WORST) -> list[Head]:
        """The ``count`` heads of largest figure (ties: in layer, batch, head order)."""
        return sorted(self.heads, key=lambda h: -h.value)[:count]

    @property
    def label(self) -> str:
        return self.method + (" (oracle)" if self.role == "oracle" else "")


def _per_slice(summary: Summary | None) -> list[float] | None:
    if summary is None or not summary.per_slice:
        return None
    return [math.inf if v is None else float(v) for v in summary.per_slice]


def _seed_means(columns: list[list[float]]) -> list[float]:
    """Per slice, the mean over seeds (each column one seed's slices)."""
    return [
        statistics.fmean(values) if all(map(math.isfinite, values)) else math.inf
        for values in zip(*columns)
    ]


def diagnostic_summaries(record: Result, metric: str) -> dict[str, Summary]:
    """A result's diagnostics that keep per-slice values, by name (the error split in
    ``metric``); none where the run did not diagnose it, or for older documents."""
    found = record.diagnostics
    if found is None:
        return {}
    figures = {name: found.figure(name, metric) for name in DIAGNOSTIC_FIGURES}
    return {name: s for name, s in figures.items() if s is not None and s.per_slice}


def _shape_of(report: RunReport, layer: int | None, phase: str) -> Shape:
    part = next((x for x in report.layers if x.part == (layer, phase)), None)
    return (part.input if part is not None else report.input).shape


def worst_heads(
    report: RunReport, metric: str | None = None, roles: Sequence[str] = ("approximation", "oracle")
) -> list[HeadProfile]:
    """Every setting's heads (ok records of ``roles``; ``metric`` None: the primary metric), in
    order of first appearance; a setting whose records keep no per-slice values is left out."""
    metric = primary_metric(report.results) if metric is None else metric
    groups: dict[tuple, list[Result]] = {}
    for record in report.results:
        if record.ok and record.role in roles:
            groups.setdefault(record.setting[1:], []).append(record)
    profiles = []
    for records in groups.values():
        heads = [
            head
            for seeds in group_settings(records)  # one layer's seeds
            for head in _layer_heads(report, seeds, metric)
        ]
        if heads:
            first = records[0]
            profiles.append(
                HeadProfile(
                    first.method,
                    first.budget,
                    first.params,
                    first.role,
                    first.phase,
                    metric,
                    tuple(heads),
                )
            )
    return profiles


def _layer_heads(report: RunReport, seeds: Sequence[Result], metric: str) -> list[Head]:
    """One layer's heads: the seed-mean of each slice of ``metric`` and of each diagnostic."""
    columns = [c for c in (_per_slice(r.errors.get(metric)) for r in seeds) if c is not None]
    if not columns:
        return []
    values = _seed_means(columns)
    diagnostics: dict[str, list[float]] = {}
    found = [diagnostic_summaries(r, metric) for r in seeds]
    for name in dict.fromkeys(n for figures in found for n in figures):
        kept = [_per_slice(figures.get(name)) for figures in found]
        if all(k is not None and len(k) == len(values) for k in kept):
            diagnostics[name] = _seed_means(kept)
    first = seeds[0]
    shape = _shape_of(report, first.layer, first.phase)
    floors = report.floors_of(first.layer, first.phase).mean.get(metric)
    floor = list(floors.per_slice) if floors is not None else []
    floor = floor if len(floor) == len(values) else [None] * len(values)
    return [
        Head(
            first.layer,
            *slice_position(shape, index),
            value,
            floor[index],
            {name: figures[index] for name, figures in diagnostics.items()},
        )
        for index, value in enumerate(values)
    ]


# ---- the cheapest setting every head meets -------------------------------------------------------


def every_head_settings(results: Iterable[Result], metric: str) -> list[Setting]:
    """One ``Setting`` per method × budget × parameters × phase across layers, its ``metric``
    the figure of its worst head (over every layer; inf when a slice was not finite).  A setting
    whose records keep no per-slice values has no figure."""
    groups: dict[tuple, list[Result]] = {}
    for record in results:
        groups.setdefault(record.setting[1:], []).append(record)
    settings = []
    for records in groups.values():
        ok = [r for r in records if r.ok]
        worst = []
        for seeds in group_settings(ok):
            columns = [_per_slice(r.errors.get(metric)) for r in seeds]
            if columns and None not in columns:
                worst.append(max(_seed_means(columns)))
            else:
                worst = None
                break
        errors = {metric: SeedStats(max(worst), None)} if worst else {}
        layers = {r.layer for r in records}
        settings.append(Setting(tuple(records), errors, None, over_layers=len(layers) > 1))
    return settings


def cheapest_every_head(
    results: Iterable[Result], target_error: float, metric: str | None = None
) -> Pareto:
    """Each method's cheapest setting whose every head (the max over heads and layers of each
    head's seed-mean ``metric``) is at most ``target_error``: ``cheapest_settings`` with the
    worst head in place of the mean.  The picks' errors are their worst heads'."""
    results = list(results)
    metric = primary_metric(results) if metric is None else metric
    pareto = cheapest_of(every_head_settings(results, metric), target_error, metric)
    return dataclasses.replace(pareto, every_head=True)


# ---- the worst-heads table -----------------------------------------------------------------------


@dataclass(frozen=True)
class HeadRow:
    """One line of the table: a head, and its setting (named on the setting's first line)."""

    profile: HeadProfile
    head: Head
    first: bool


def _number(value: float | None) -> str:
    if value is None:
        return MISSING
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _rows(profiles: Sequence[HeadProfile], count: int) -> list[HeadRow]:
    return [HeadRow(p, head, i == 0) for p in profiles for i, head in enumerate(p.worst(count))]


def head_layout(rows: Sequence[HeadRow], metric: str) -> Layout[HeadRow]:
    """Method, budget, the mean over heads, the head and its figure; its diagnostics and its
    mean-of-V floor while they fit."""

    def on_first(cell):
        return lambda row: cell(row) if row.first else ""

    budget = on_first(lambda r: MISSING if r.profile.budget is None else str(r.profile.budget))
    columns = [
        Column("method", "method", on_first(lambda r: r.profile.label), justify="left"),
        Column("budget", "budget", budget),
        Column("mean", "mean of\nheads", on_first(lambda r: _number(r.profile.mean))),
        Column("head", "head", lambda r: r.head.label, justify="left"),
        Column("error", f"head's\n{_short(metric)}", lambda r: _number(r.head.value)),
    ]
    names = list(dict.fromkeys(n for r in rows for n in r.head.diagnostics))
    for name in names:
        short = SHORT_NAMES.get(name, name)
        columns.append(Column(short, short, lambda r, n=name: _number(r.head.diagnostics.get(n))))
    if any(r.head.floor is not None for r in rows):  # last: the diagnostics say more
        columns.append(Column("floor", "head's\nfloor", lambda r: _number(r.head.floor)))
    keys = tuple(c.key for c in columns)
    return Layout(tuple(columns), keys[:5], keys[5:])


def _short(metric: str) -> str:
    """rel_spectral -> spectral: the column's header, under the title that names the metric."""
    return metric.removeprefix("rel_")


def _title(profiles: Sequence[HeadProfile], count: int) -> str:
    heads = max(len(p.heads) for p in profiles)
    return f"the {min(count, heads)} worst of {heads} heads by {profiles[0].metric} (seed-means)"


def left_out_line(width: int, left_out: Sequence[str]) -> str:
    """Under the table: the diagnostics it had no room for, and where they are."""
    return (
        f"Not shown at width {width}: {', '.join(left_out)} (a wider terminal, --format markdown "
        "or --output FILE shows them)."
    )


def worst_heads_table(
    report: RunReport, console: Console, count: int = WORST, metric: str | None = None
) -> None:
    """The worst ``count`` heads of each setting, fitted to the console's width."""
    profiles = worst_heads(report, metric)
    if not profiles:
        console.print("per head: no ok result keeps per-head figures.", highlight=False)
        return
    rows = _rows(profiles, count)
    choice = table.choose(head_layout(rows, profiles[0].metric), rows, console.width)
    # its own note: --columns chooses the columns of the table above, not these
    table.draw(console, _title(profiles, count), dataclasses.replace(choice, left_out=[]), rows)
    if choice.left_out:
        console.print(left_out_line(choice.width, choice.left_out), highlight=False, markup=False)


def worst_heads_markdown(
    report: RunReport, count: int = WORST, metric: str | None = None
) -> list[str]:
    """The same table as GitHub Markdown, every column."""
    profiles = worst_heads(report, metric)
    if not profiles:
        return ["per head: no ok result keeps per-head figures."]
    rows = _rows(profiles, count)
    return table.markdown_table(
        head_layout(rows, profiles[0].metric), rows, _title(profiles, count)
    )
