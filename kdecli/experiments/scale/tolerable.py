"""``kdecli scale --target-error E``: each method's smallest budget meeting E, at every length.

The question the sparse-attention literature asks ("longer sequences tolerate more sparsity"):
at each length n (a ``synthetic:`` input drawn at n, or a file cropped to its first n positions,
queries and keys: for a causal capture, the causal prefill of its first n tokens), which is the
smallest budget m of a grid whose error meets E, and what density m / n is that?

The error is the run's primary metric, rel_spectral under the full reference (rel_frobenius's
estimate under a row sample), as the mean over seeds (randomized methods run ``seeds`` seeds) of
each record's mean over batch×head slices; with ``every_head`` a budget meets E only when every
slice does (the largest over slices of the seed-mean per slice).  The grid is the budgets given,
or the powers of two from 16 up to n and n itself, keeping those at most n at each length.

Search ``bisect`` assumes the error falls as the budget grows: it halves the interval between a
miss and a meet on the sorted grid, ⌈log₂(size + 1)⌉ measurements per method and length, the
grid's largest budget among them only when every smaller one missed (a miss there is the answer
"none").  Every measured point
is kept (``Probe``) and an answer whose probes contradict the assumption is marked
(``monotone`` false).  Search ``all`` measures every grid value and answers the smallest that
meets E, with no assumption.  Each length has one reference; every point is a ``compare`` of one
method at one budget against it (``reuse``), without the timing pass (no time is measured here)
and without the diagnostics unless ``config.diagnostics`` asks for them: then every point also
carries its measured density (kept keys over allowed keys) and mass recall.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kdecli.errors import UsageError
from kdecli.experiments.compare.pareto import check_target_error
from kdecli.experiments.compare.plan import plan_jobs
from kdecli.experiments.compare.records import Result, RunReport
from kdecli.experiments.compare.run import compare
from kdecli.experiments.scale.records import ScaleReport
from kdecli.experiments.scale.run import input_at
from kdecli.experiments.scale.tolerable_records import (
    CRITERIA,
    SEARCHES,
    LengthInfo,
    Probe,
    Tolerable,
    TolerableSearch,
)
from kdecli.measure.config import RunConfig
from kdecli.methods import get_method_class
from kdecli.qkv import QKV
from kdecli.sources import InputOptions

SMALLEST_DEFAULT = 16  # the default grid: powers of two from here up to n (and n itself)


def parse_budgets(spec: str | Sequence[int] | None) -> list[int] | None:
    """``"16,64,256"`` -> increasing distinct positive budgets; None: the default grid."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    budgets = set()
    for item in items:
        text = str(item)
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"--budgets must be comma-separated positive integers; got {text!r}.")
        budgets.add(int(text))
    if not budgets:
        raise UsageError("--budgets is empty.")
    return sorted(budgets)


def budget_grid(n: int, given: Sequence[int] | None = None) -> list[int]:
    """The budgets searched at length n: ``given`` ones at most n, or the default grid."""
    if given is not None:
        return [b for b in sorted(set(given)) if b <= n]
    grid, b = [], SMALLEST_DEFAULT
    while b < n:
        grid.append(b)
        b *= 2
    return [*grid, n]


def smallest_meeting(grid: Sequence[int], meets: Callable[[int], bool], search: str) -> int | None:
    """The smallest budget of the sorted ``grid`` for which ``meets`` holds (None: none does);
    ``bisect`` assumes it holds from some budget on (module docstring), ``all`` asks every one.

    Bisection keeps a miss below and a meet above, starting from the virtual grid[-1] (a miss)
    and grid[len] (a meet), and asks the middle: ⌈log₂(len + 1)⌉ questions, the largest budget
    (the costliest call) only when every smaller one missed."""
    if search == "all":
        answers = [b for b in grid if meets(b)]  # every value asked, in order
        return answers[0] if answers else None
    low, high = -1, len(grid)  # grid[low] misses, grid[high] meets (virtual at both ends)
    while high - low > 1:
        middle = (low + high) // 2
        if meets(grid[middle]):
            high = middle
        else:
            low = middle
    return grid[high] if high < len(grid) else None


def probe_of(
    n: int, method: str, budget: int, run: RunReport, target: float, every_head: bool
) -> Probe:
    """One point from the records of one method × budget (one per seed)."""
    metric = run.reference.primary_metric
    records = [r for r in run.results if r.method == method]
    failed = next((r for r in records if r.status != "ok"), None)
    if failed is not None or not records:
        status = failed.status if failed else "interrupted"
        reason = failed.reason if failed else "the run stopped before this point"
        return Probe(n, method, budget, status, None, None, False, reason=reason)
    per_seed = tuple(r.error(metric) for r in records)
    error = _mean(per_seed)
    worst = _worst_head(records, metric)
    figure = worst if every_head else error
    keys = _mean(tuple(r.keys_per_query for r in records))
    meets = figure is not None and figure <= target
    density, recall = (_diagnosed(records, name) for name in ("density", "mass_recall"))
    return Probe(n, method, budget, "ok", error, worst, meets, per_seed, keys, density, recall)


def _mean(values: tuple[float | None, ...]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _diagnosed(records: Sequence[Result], name: str) -> float | None:
    """The seed-mean of a diagnostic's slice-mean (None where it was not computed)."""
    figures = [None if r.diagnostics is None else r.diagnostics.figure(name) for r in records]
    return _mean(tuple(None if f is None else f.mean for f in figures))


def _worst_head(records: Sequence[Result], metric: str) -> float | None:
    """The largest batch×head slice of the seed-mean per slice (the summary's max without
    slices)."""
    slices = [r.errors[metric].per_slice if metric in r.errors else () for r in records]
    if all(slices) and len({len(s) for s in slices}) == 1:
        means = [_mean(tuple(column)) for column in zip(*slices)]
        return None if any(m is None for m in means) else max(means)
    if len(records) == 1 and metric in records[0].errors:
        return records[0].errors[metric].max
    return None


def answer_of(
    n: int,
    method: str,
    grid: Sequence[int],
    budget: int | None,
    probes: Sequence[Probe],
    every_head: bool = False,
) -> Tolerable:
    """The answer from the search's result and its probes (density, the marks)."""
    ordered = sorted(probes, key=lambda p: p.budget)
    monotone = not any(
        earlier.meets and not later.meets
        for i, earlier in enumerate(ordered)
        for later in ordered[i + 1 :]
    )
    if budget is None:
        largest = next((p for p in ordered if p.budget == grid[-1]), None)
        reason = largest.reason if largest is not None and largest.status != "ok" else None
        return Tolerable(n, method, None, None, None, grid[-1], False, monotone, reason)
    met = next(p for p in ordered if p.budget == budget)
    figure = met.worst_head if every_head else met.error
    return Tolerable(n, method, budget, budget / n, figure, grid[-1], budget == grid[0], monotone)


def check_request(
    methods: Sequence[str],
    lengths: Sequence[int],
    target_error: float,
    grid: Sequence[int] | None,
    search: str,
    params: dict[str, dict[str, Any]] | None,
    config: RunConfig,
) -> None:
    """Every refusal before any input is read past its header: one line each."""
    check_target_error(target_error)
    if search not in SEARCHES:
        raise UsageError(f"--search must be one of {', '.join(SEARCHES)}; got {search!r}.")
    if config.phase == "both":
        raise UsageError("scale measures one phase: --phase prefill or --phase decode.")
    if not methods:
        raise UsageError("--methods is empty.")
    if not lengths:
        raise UsageError("--n: give at least one length.")
    if config.phase == "decode" and config.queries > min(lengths):
        raise UsageError(
            f"--queries {config.queries} is more than the shortest cache, --n {min(lengths)}."
        )
    free = [name for name in methods if not get_method_class(name).uses_budget]
    if free:
        raise UsageError(
            f"--target-error searches a budget; {', '.join(free)} takes none (drop it)."
        )
    for n in lengths:
        if grid is not None and not budget_grid(n, grid):
            raise UsageError(f"--budgets: no budget is at most n = {n} (a budget counts keys).")
    # names and parameters, checked as compare checks them
    plan_jobs(
        methods, budget_grid(min(lengths), grid)[:1], params, min(lengths), config.budget_mode
    )


def tolerable_budgets(
    spec: str,
    methods: Sequence[str],
    lengths: Sequence[int],
    target_error: float,
    config: RunConfig | None = None,
    *,
    budgets: Sequence[int] | None = None,
    every_head: bool = False,
    search: str = "bisect",
    options: InputOptions | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ScaleReport:
    """Each method's smallest budget of the grid meeting ``target_error`` at every length of
    ``spec`` (module docstring), as a scale document whose ``tolerable`` holds the answers and
    every point measured.  ``should_stop()`` ends the search between points, keeping the
    lengths that finished."""
    config = config or RunConfig()
    # errors only: no timing pass, and no diagnostics pass unless asked (it costs more than the
    # call it diagnoses); asked, each point carries its measured density and mass recall
    diagnose = bool(config.diagnostics)
    config = replace(config, timing=False, diagnostics=diagnose)
    lengths = sorted(lengths)
    grid = None if budgets is None else sorted(set(budgets))
    check_request(methods, lengths, target_error, grid, search, params, config)
    longest = input_at(spec, lengths[-1], options)  # n past the input: refused before any run
    record = TolerableSearch(
        target_error=float(target_error),
        metric="rel_spectral",
        criterion=CRITERIA[1] if every_head else CRITERIA[0],
        search=search,
        grid=grid,
        methods=list(methods),
    )
    report = ScaleReport(input=spec, budget=None, lengths=[], phase=config.phase, tolerable=record)
    searcher = _Searcher(record, config, every_head, params, should_stop)
    for index, n in enumerate(lengths):
        if should_stop and should_stop():
            report.interrupted = True
            break
        qkv = longest if n == lengths[-1] else input_at(spec, n, options)
        label = None
        if on_progress:
            label = lambda text, i=index: on_progress(i, len(lengths), text)  # noqa: E731
        if not searcher.length(qkv, n, methods, label):
            report.interrupted = True
            break
        report.lengths.append(n)
    if on_progress:
        on_progress(len(report.lengths), len(lengths), "done")
    report.environment = record.environment
    return report


@dataclass
class _Searcher:
    """What every length's search shares: the record it fills and how it measures."""

    record: TolerableSearch
    config: RunConfig
    every_head: bool
    params: dict[str, dict[str, Any]] | None
    should_stop: Callable[[], bool] | None
    stopped: bool = False

    def length(self, qkv: QKV, n: int, methods: Sequence[str], label) -> bool:
        """Search every method at length n into the record; False when stopped part way (the
        length's points are then left out: a document holds whole lengths)."""
        grid = budget_grid(n, self.record.grid)
        found: list[tuple[list[Probe], Tolerable]] = []
        for method in methods:
            measured: list[Probe] = []

            def meets(budget: int, method: str = method, measured=measured) -> bool:
                if self.stopped or (self.should_stop and self.should_stop()):
                    self.stopped = True
                    return False
                if label:
                    label(f"n = {n:,}: {method} budget {budget}")
                measured.append(self.measure(qkv, n, method, budget))
                return measured[-1].meets

            budget = smallest_meeting(grid, meets, self.record.search)
            if self.stopped:
                lengths = self.record.lengths
                lengths[:] = [info for info in lengths if info.n != n]
                return False
            found.append((measured, answer_of(n, method, grid, budget, measured, self.every_head)))
        for measured, answer in found:
            self.record.probes.extend(sorted(measured, key=lambda p: p.budget))
            self.record.budgets.append(answer)
        return True

    def measure(self, qkv: QKV, n: int, method: str, budget: int) -> Probe:
        """One method at one budget against the length's reference (computed at its first
        point, then reused)."""
        own = _params_for(method, self.params)
        run = compare(
            qkv, [method], [budget], self.config, params=own, reuse=True,
            should_stop=self.should_stop,
        )  # fmt: skip
        record = self.record
        if not record.lengths or record.lengths[-1].n != n:
            metric = run.reference.primary_metric
            floor = run.floors.mean_floor(metric)
            record.lengths.append(LengthInfo(n, run.input, run.reference, floor))
            if len(record.lengths) == 1:
                record.metric = metric
            record.environment = record.environment or run.environment
        self.stopped = self.stopped or run.interrupted
        return probe_of(n, method, budget, run, record.target_error, self.every_head)


def _params_for(method: str, params: dict[str, dict[str, Any]] | None):
    """The parameters of ``params`` that ``method`` takes, under its own name (``*`` included:
    ``compare`` refuses a shared parameter that no method of its run takes)."""
    if not params:
        return None
    names = {p.name for p in get_method_class(method).params}
    own = {key: value for key, value in params.get("*", {}).items() if key in names}
    own.update(params.get(method, {}))
    return {method: own} if own else None
