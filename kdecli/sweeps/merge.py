"""`kdecli merge`: the shards of one job grid as one document, whatever their order or overlap.

A merge is a function of the *set* of records its parts hold, so merging in any order gives the
same bytes, and merging a merge with one of its parts (or with itself) changes nothing:

- Every part must carry its grid (``RunReport.grid``), and all the same one (the digest); else
  the merge is refused, naming the file and what differs (``GridInfo.difference``).
- Records are matched by key; a record without one, or whose key is not in the grid, is refused.
  A part that is itself a merge gives its conflicts' records back as records.
- The candidates of a key are its ``ok`` records if it has any (an ok retry supersedes a failure),
  else all of them.  They are grouped by their *measurement*: the record without ``time`` and
  ``environment``, its numbers equal within ``TOLERANCE`` (timings differ from run to run;
  errors do not, past rounding: every generator depends on method and seed only).  In the order
  of their canonical JSON (sorted keys), each record joins the first group whose first record it
  measures the same as, else starts one; so a group's representative is its smallest record, the
  rest of the group are identical duplicates, dropped, and a subset holding every representative
  groups the same (a merge of a merge).  Several groups of
  ok records are a conflict: the smallest representative stands in ``results``, the others go to
  ``merge.conflicts``.  Of failures alone the smallest stands.
- Everything else is chosen the same way: the header (environment, input, floors, reference,
  kdecli version) of the part whose header's canonical JSON is smallest; per layer, the smallest
  layer entry; the grid without its shard.  Results follow the grid's job order; ``merge.missing``
  lists, in that order, the grid's records that no part holds.  No file names or counts go into
  the document; the counts come back beside it (``Merged``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kdecli.errors import UsageError
from kdecli.experiments.compare.records import (
    READS_HINT,
    Conflict,
    LayerInfo,
    MergeInfo,
    Result,
    RunReport,
)
from kdecli.records import SchemaError, clean
from kdecli.sweeps.grid import GridInfo, JobEntry

UNTIMED = ("time", "environment")  # what may differ between two runs of the same measurement
# Numbers within this relative distance are the same measurement: the last bits of an SVD
# (rel_spectral) and of float32 feature products change with the thread count and the CPU, so two
# machines (or a Ray worker's one thread and a local run's two) need not agree bit for bit: on the
# README's GloVe sweep they differed by up to 1.8e-6 (benchmarks/bench_sweeps.py).  The table
# shows four digits.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Merged:
    """A merged document and what the merge did: identical duplicates dropped, failures that
    another record of their key superseded, the conflicts and the missing records (both also in
    ``report.merge``)."""

    report: RunReport
    duplicates_dropped: int = 0
    superseded: int = 0
    conflicts: tuple[Conflict, ...] = ()
    missing: tuple[JobEntry, ...] = ()

    @property
    def records(self) -> int:
        return len(self.report.results)

    @property
    def grid_records(self) -> int:
        return 0 if self.report.grid is None else len(self.report.grid.jobs)


def canonical(value: Any) -> str:
    """The canonical JSON that orders records and headers: sorted keys, NaN and inf as null."""
    return json.dumps(clean(value), sort_keys=True)


def measurement(record: Result) -> dict[str, Any]:
    """What a record measured: all of it but its time and environment."""
    return _untimed(record)


def same_measurement(a: Any, b: Any) -> bool:
    """Equal but for numbers, which may differ by ``TOLERANCE`` relative to the larger."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_measurement(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_measurement(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        if isinstance(b, bool):
            return False
        return abs(a - b) <= TOLERANCE * max(abs(a), abs(b))
    return a == b


def merge_reports(reports: Sequence[RunReport], names: Sequence[str]) -> Merged:
    """Merge the parts of one grid (``names``: their file names, for messages); see the module
    docstring for the rules."""
    if not reports:
        raise UsageError("nothing to merge: give at least one results file.")
    if len(names) != len(reports):
        raise ValueError(f"{len(reports)} reports but {len(names)} names")
    parts = [_normal(report, name) for report, name in zip(reports, names)]
    grid = _common_grid(parts, names)
    candidates = _candidates(parts, names, grid)
    results, conflicts, missing = [], [], []
    dropped = superseded = 0
    for job in grid.jobs:
        if job.key not in candidates:
            missing.append(job)
            continue
        settled = _settle(candidates[job.key])
        results.append(settled.kept)
        dropped += settled.dropped
        superseded += settled.superseded
        if settled.others:
            conflicts.append(Conflict(job.key, job, settled.others))
    layers = _layers(parts)
    header = min(parts, key=lambda part: canonical(_header(part, bool(layers))))
    first = layers[0] if layers else LayerInfo(None, header.input, header.floors)
    report = RunReport(
        environment=header.environment,
        input=first.input,
        floors=first.floors,
        results=results,
        kdecli_version=header.kdecli_version,
        layers=layers,
        reference=header.reference,
        grid=grid,
        merge=MergeInfo(tuple(missing), tuple(conflicts)),
    )
    return Merged(report, dropped, superseded, tuple(conflicts), tuple(missing))


def differences(a: Result, b: Result, limit: int = 3) -> str:
    """What two records' measurements differ in, in words: ``errors.rel_spectral.mean 0.0312 vs
    0.0451; …`` (the first ``limit`` fields, then how many more)."""
    found = list(_diff(_untimed(a), _untimed(b), ""))
    text = "; ".join(found[:limit])
    return text + (f"; and {len(found) - limit} more" if len(found) > limit else "")


# ---- pieces --------------------------------------------------------------------------------------


def _normal(report: RunReport, name: str) -> RunReport:
    """The report as a file holds it (written and read back once), so a report built in memory and
    one loaded from its file merge to the same bytes (an int read where a float is written, …)."""
    return RunReport.from_dict(json.loads(json.dumps(report.to_dict())), name)


def _common_grid(parts: Sequence[RunReport], names: Sequence[str]) -> GridInfo:
    for part, name in zip(parts, names):
        if part.grid is None:
            raise SchemaError(
                f"{name} has no grid: it was written by `kdecli compare` before 0.6, or not by "
                "compare, so its records cannot be matched to a sweep's.",
                hint="Rerun that sweep with this kdecli (`kdecli compare ... --format jsonl -o "
                "FILE`, split with --num-shards N --shard-id I), then merge its files.",
            )
    first, first_name = parts[0].grid, names[0]
    for part, name in zip(parts[1:], names[1:]):
        difference = first.difference(part.grid)
        if difference is not None:
            raise UsageError(f"{name} is of a different grid than {first_name}: {difference}.")
    # the same digest is the same set of records; the spec may still list methods in another
    # order, so the grid too is chosen by its canonical JSON
    return min((part.grid.unsharded() for part in parts), key=lambda g: canonical(g.to_dict()))


def _candidates(
    parts: Sequence[RunReport], names: Sequence[str], grid: GridInfo
) -> dict[str, list[Result]]:
    """Every record of every part, by key, each checked against the grid."""
    entries = {job.key: job for job in grid.jobs}
    candidates: dict[str, list[Result]] = {}
    for part, name in zip(parts, names):
        for record in _records(part):
            _check_record(record, entries, name)
            candidates.setdefault(record.key, []).append(record)
    return candidates


def _records(part: RunReport) -> Iterator[Result]:
    yield from part.results
    if part.merge is not None:
        for conflict in part.merge.conflicts:
            yield from conflict.records


def _entry(record: Result) -> JobEntry:
    return JobEntry(
        record.key or "", record.layer, record.method, record.budget, record.seed, record.phase
    )


def _check_record(record: Result, entries: dict[str, JobEntry], name: str) -> None:
    if record.key is None:
        raise SchemaError(
            f"{name}: the record {_entry(record).describe()} has no key, so it cannot be matched "
            "to the grid's records.",
            hint="Records carry keys from kdecli 0.6; rerun that part with this kdecli. "
            + READS_HINT,
        )
    if record.key not in entries:
        raise SchemaError(
            f"{name}: the record {_entry(record).describe()} (key {record.key}) is not in the "
            "file's grid: the file was edited, or its records and header come from different "
            "runs.",
            hint="Merge the files that `kdecli compare` wrote, as it wrote them.",
        )


@dataclass(frozen=True)
class _Settled:
    kept: Result
    others: tuple[Result, ...]  # a conflict's other measurements, smallest first
    dropped: int  # identical duplicates
    superseded: int  # failures that another record stands for


def _settle(records: list[Result]) -> _Settled:
    """One key's records -> the one that stands, and what became of the rest."""
    ok = [record for record in records if record.ok]
    pool = ok or records
    groups: list[tuple[dict[str, Any], Result]] = []  # each group's first measurement, record
    for record in sorted(pool, key=lambda r: canonical(r.to_dict())):
        measured = measurement(record)
        if not any(same_measurement(first, measured) for first, _ in groups):
            groups.append((measured, record))
    kept, *rest = (record for _, record in groups)
    superseded = len(records) - len(pool)
    if not ok:  # failures alone: not a conflict of measurements, the smallest one stands
        return _Settled(kept, (), len(pool) - len(groups), superseded + len(rest))
    return _Settled(kept, tuple(rest), len(pool) - len(groups), superseded)


def _layers(parts: Sequence[RunReport]) -> list[LayerInfo]:
    """The union of the parts' layers: per layer index (and phase) the entry whose canonical JSON
    is smallest, in layer order, prefill before decode."""
    by_layer: dict[tuple[int | None, str], list[LayerInfo]] = {}
    for part in parts:
        for info in part.layers:
            by_layer.setdefault(info.part, []).append(info)
    chosen = [min(infos, key=lambda info: canonical(info.to_dict())) for infos in by_layer.values()]
    return sorted(
        chosen,
        key=lambda info: (info.layer is None, info.layer or 0, info.input.phase != "prefill"),
    )


def _header(part: RunReport, layered: bool) -> dict[str, Any]:
    """What the merged header takes from one part.  A run over layers takes its input and floors
    from its first layer instead, so they do not decide which part's header is taken: a merge's
    own header then is the header it chose, and merging it again chooses it again."""
    header = {
        "environment": part.environment.to_dict(),
        "reference": part.reference.to_dict(),
        "kdecli_version": part.kdecli_version,
    }
    if not layered:
        header |= {"input": part.input.to_dict(), "floors": part.floors.to_dict()}
    return header


def _untimed(record: Result) -> dict[str, Any]:
    return clean({k: v for k, v in record.to_dict().items() if k not in UNTIMED})


def _diff(a: Any, b: Any, path: str) -> Iterator[str]:
    """The leaves where ``a`` and ``b`` differ, as ``path a vs b``, in sorted-key order."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif not same_measurement(a, b):  # within TOLERANCE is not a difference
        left, right = _value(a), _value(b)
        if left == right:  # numbers that agree to 6 digits: every digit
            left, right = repr(a), repr(b)
        yield f"{path} {left} vs {right}"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:39] + "…"
