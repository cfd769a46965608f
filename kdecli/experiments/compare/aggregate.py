"""From records to settings: the seeds of one method × budget × parameters, summarised.

A table row, a Pareto candidate and a plotted point are all one *setting*; its error is a
``SeedStats`` (``kdecli.measure.figures``): the mean over seeds of each record's slice-mean (the
std is over seeds, the max over slices and seeds, a row sample's bounds the means of the seeds').
The comparison with the mean-of-V floor is defined here once (``beats_floor``), for records and
for settings alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kdecli.experiments.compare.records import Result
from kdecli.measure.figures import ResultTime, SeedStats, Summary
from kdecli.measure.metrics import METRICS

_MEASURED = Summary(None, None)  # a stand-in for a metric a record does not hold

STATUS_ORDER = ("error", "oom", "unsupported", "ok")  # worst first


def beats_floor(error: float | None, floor: float | None) -> bool | None:
    """Is ``error`` strictly below the mean-of-V floor?  None when either is unknown."""
    if error is None or floor is None:
        return None
    return error < floor


@dataclass(frozen=True)
class Setting:
    """One method × budget × parameters, its records' seeds summarised."""

    records: tuple[Result, ...]
    errors: dict[str, SeedStats]
    beats_mean_floor: bool | None
    over_layers: bool = False  # a mean over the layers of a capture, not one layer

    @property
    def layer(self) -> int | str | None:
        return "all" if self.over_layers else self.first.layer

    @property
    def phase(self) -> str:
        return self.first.phase

    @property
    def first(self) -> Result:
        return self.records[0]

    @property
    def method(self) -> str:
        return self.first.method

    @property
    def budget(self) -> int | None:
        return self.first.budget

    @property
    def params(self) -> dict:
        return self.first.params

    @property
    def role(self) -> str:
        return self.first.role

    @property
    def estimates(self) -> str:
        return self.first.estimates

    @property
    def seeds(self) -> int:
        return len(self.records)

    @property
    def ok_records(self) -> tuple[Result, ...]:
        return tuple(r for r in self.records if r.ok)

    @property
    def status(self) -> str:
        """``ok`` when every seed ran; otherwise the worst status among them."""
        if all(r.ok for r in self.records):
            return "ok"
        return min((r.status for r in self.records), key=STATUS_ORDER.index)

    @property
    def reason(self) -> str | None:
        return next((r.reason for r in self.records if r.reason), None)

    @property
    def time(self) -> ResultTime | None:
        """The setting's timing (measured once per setting, shared by its seeds); none for a mean
        over layers, whose layers were each timed on their own."""
        if self.over_layers:
            return None
        return next((r.time for r in self.ok_records if r.time and r.time.method_s), None)

    @property
    def flops(self) -> float | None:
        return next((r.flops for r in self.ok_records if r.flops is not None), None)

    @property
    def flops_fraction(self) -> float | None:
        """FLOPs over exact attention's at the same shape (the same for every seed)."""
        return next(
            (r.flops_fraction for r in self.ok_records if r.flops_fraction is not None), None
        )

    @property
    def keys_per_query(self) -> float | None:
        return next(
            (r.keys_per_query for r in self.ok_records if r.keys_per_query is not None), None
        )

    def error(self, metric: str) -> float | None:
        stats = self.errors.get(metric)
        return None if stats is None else stats.mean

    def unavailable(self, metric: str) -> str | None:
        """Why ``metric`` was not measured (a row-sampled reference cannot), if it was not."""
        return next((r.errors[metric].note for r in self.ok_records if metric in r.errors), None)

    @property
    def diagnosed(self) -> bool:
        """Were this setting's calls diagnosed (``--diagnostics``), with or without figures?"""
        return any(r.diagnostics is not None for r in self.ok_records)

    def diagnostic(self, name: str, metric: str = "rel_spectral") -> SeedStats | None:
        """A diagnostic figure (``kdecli.measure.figures.DIAGNOSTIC_FIGURES``; the selection and
        estimation errors in ``metric``) over the records behind the setting (its seeds; for a
        mean over layers, every layer's): None where no record has it."""
        parts = [r.diagnostics.figure(name, metric) for r in self.ok_records if r.diagnostics]
        return SeedStats.over([p for p in parts if p is not None])

    @property
    def diagnostics_note(self) -> str | None:
        """Why the diagnostics are null or partial (the method has no key set, ...)."""
        return next((r.diagnostics.note for r in self.ok_records if r.diagnostics), None)


def primary_metric(results: Iterable[Result]) -> str:
    """rel_spectral, or rel_frobenius where the records were measured on a row sample (which
    cannot give rel_spectral): the metric that ranks settings and meets the floor."""
    sampled = any(r.ok and r.errors.get("rel_spectral", _MEASURED).note for r in results)
    return "rel_frobenius" if sampled else "rel_spectral"


def _seed_stats(records: Sequence[Result], name: str) -> SeedStats | None:
    """Mean and std over seeds of the records' slice-means; max over slices and seeds; the mean
    interval bounds (``SeedStats.over``)."""
    return SeedStats.over([r.errors[name] for r in records if name in r.errors])


def group_settings(results: Iterable[Result]) -> list[tuple[Result, ...]]:
    """The records of each setting, in order of first appearance."""
    groups: dict[tuple, list[Result]] = {}
    for record in results:
        groups.setdefault(record.setting, []).append(record)
    return [tuple(records) for records in groups.values()]


def aggregate(
    results: Iterable[Result],
    mean_floor: float | Callable[[Result], float | None] | None = None,
    metric: str = "rel_spectral",
) -> list[Setting]:
    """One ``Setting`` per layer × phase × method × budget × parameters, in order of first
    appearance.

    ``beats_mean_floor`` compares the seed-mean ``metric`` with the mean-of-V floor: a number, or
    a function of a record (each layer of a capture and each phase has its own); a baseline gets
    None.
    """
    floor_of = mean_floor if callable(mean_floor) else (lambda record: mean_floor)
    settings = []
    for records in group_settings(results):
        ok = [r for r in records if r.ok]
        errors = {}
        for name in METRICS:
            stats = _seed_stats(ok, name)
            if stats is not None:
                errors[name] = stats
        beats = None
        if records[0].role != "baseline" and metric in errors:
            beats = beats_floor(errors[metric].mean, floor_of(records[0]))
        settings.append(Setting(tuple(records), errors, beats))
    return settings


def mean_over_layers(
    settings: Iterable[Setting],
    mean_floor: Callable[[Result], float | None],
    metric: str = "rel_spectral",
) -> list[Setting]:
    """Per phase × method × budget × parameters over the layers of a capture: the mean over layers of
    each layer's seed-mean (``std`` is then the spread over layers), compared with the mean of the
    layers' floors."""
    groups: dict[tuple, list[Setting]] = {}
    for setting in settings:
        if setting.first.layer is not None:
            groups.setdefault(setting.first.setting[1:], []).append(setting)
    means = []
    for group in groups.values():
        errors = {}
        for name in METRICS:
            stats = [s.errors[name] for s in group if name in s.errors]
            if len(stats) == len(group):  # as over seeds: the mean of the layers' bounds
                errors[name] = SeedStats.over(stats)
        floors = [mean_floor(s.first) for s in group]
        beats = None
        if group[0].role != "baseline" and metric in errors and None not in floors:
            beats = beats_floor(errors[metric].mean, statistics.fmean(floors))
        records = tuple(r for s in group for r in s.records)
        means.append(Setting(records, errors, beats, over_layers=True))
    return means
