"""The verdict under every table: one or two plain sentences computed from the results.

A table holds the numbers; the verdict says what they mean for the question kdecli answers (how
wrong is an approximation here, and does it save time?):

1. **Below the floor.**  At each budget (``scale``: each length n), the method with the lowest
   error among those strictly below the mean-of-V floor (the error of answering every query with
   the mean of V; drift: the ``mean`` baseline's figure), or that none is.  Only approximations
   and oracles compete: the reference (``exact``) and the baselines are what they are read
   against.
2. **Faster than exact.**  The cheapest setting (fewest FLOPs, then the smallest budget) whose
   speed-up over exact attention is above 1 and whose error is below the floor, or, when none is,
   that none is at this n on this device.  A scale document also says from which n one would be,
   from the fitted power laws t ≈ c·n^α of the method and of exact attention: the crossing
   n* = (c_m / c_e)^(1 / (α_e − α_m)), when α_e > α_m.
3. **Keys per query above the budget.**  A method that reads more keys per query than its
   budget's nominal cost (reformer at budget 64 with 8 hashes of 2 chunks of 32 reads 512) is
   named with the ratio, since its error is then bought with more work than the budget says.

Records that carry a ``phase`` (prefill, decode) are judged per phase.  ``Verdict`` is a typed
record: its sentences and the facts they rest on; the JSON of a document holds it as ``summary``.
One adapter per document kind (``compare_verdict``, ``scale_verdict``, ``drift_verdict``) turns
its rows into ``Point``s; ``judge`` does the rest.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kdecli.records import Record, json_field
from kdecli.render.cells import fmt_speedup

COMPETING = ("approximation", "oracle")  # the roles that are judged (not reference, baseline)
PREFILL = "prefill"


# ---- the facts and the verdict (typed records, written as the JSON's ``summary``) --------------


@dataclass(frozen=True)
class Best(Record):
    """At one budget (or length n): the method with the lowest error below the floor, or none."""

    at: int | None  # the budget, or the length n in a scale document
    method: str | None  # None: no method is below the floor here
    error: float | None
    floor: float | None
    phase: str | None = json_field(None, omit="none")
    budget: int | None = json_field(None, omit="none")  # a scale document's budget


@dataclass(frozen=True)
class Faster(Record):
    """The cheapest setting faster than exact attention, below the floor; method None: none is."""

    method: str | None
    budget: int | None
    speedup: float | None
    error: float | None
    n: int | None  # the number of keys it was timed at
    device: str | None
    phase: str | None = json_field(None, omit="none")


@dataclass(frozen=True)
class OverBudget(Record):
    """A method that reads more keys per query than its budget: the most it reads over it."""

    method: str
    budget: int
    keys_per_query: float

    @property
    def ratio(self) -> float:
        return self.keys_per_query / self.budget


@dataclass(frozen=True)
class Crossing(Record):
    """From a scale document's fits: the n from which ``method`` would be faster than exact
    (None: its time grows as fast as exact attention's or faster, so it never is)."""

    method: str
    n: float | None
    exponent: float | None
    exact_exponent: float | None


@dataclass(frozen=True)
class Verdict(Record):
    """The sentences printed under a table, and the facts they are computed from."""

    sentences: tuple[str, ...]
    metric: str  # the error the floor is compared on (rel_spectral, rel_frobenius, KL, cosine)
    below_floor: tuple[Best, ...] = ()
    faster: tuple[Faster, ...] = ()
    over_budget: tuple[OverBudget, ...] = ()
    all_at_or_above_floor: bool = False  # no judged method is below the floor anywhere
    crossings: tuple[Crossing, ...] = json_field((), omit="falsy")

    def text(self, sep: str = "\n") -> str:
        """The sentences, one a line (``sep``: how they are joined)."""
        return sep.join(self.sentences)


# ---- what the adapters give ``judge`` ----------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One setting as the verdict sees it: its error against its floor, its speed and its cost.

    ``higher_is_better``: a figure like cosine similarity, below the floor means above it."""

    method: str
    role: str
    at: int | None  # the budget (compare, drift) or the length n (scale)
    error: float | None
    floor: float | None
    speedup: float | None = None
    flops: float | None = None
    keys_per_query: float | None = None
    budget: int | None = None
    n: int | None = None
    device: str | None = None
    phase: str | None = None
    higher_is_better: bool = False

    @property
    def judged(self) -> bool:
        return self.role in COMPETING

    @property
    def beats_floor(self) -> bool:
        if self.error is None or self.floor is None:
            return False
        if self.higher_is_better:
            return self.error > self.floor
        return self.error < self.floor

    @property
    def faster(self) -> bool:
        return self.speedup is not None and self.speedup > 1


def _num(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g}"


def _n(value: float) -> str:
    return f"{value:,.0f}" if value < 1e7 else f"{value:.2g}"


def _phases(points: Sequence[Point]) -> list[str | None]:
    """The phases to judge apart: [None] for a document of one prefill phase (no prefix)."""
    phases = list(dict.fromkeys(p.phase for p in points))
    return [None] if phases in ([None], [PREFILL]) else phases


def _prefix(phase: str | None) -> str:
    return "" if phase is None else f"{phase.capitalize()}: "


def below_floor(points: Sequence[Point], phase: str | None) -> list[Best]:
    """Per budget (or n), in order: the best judged point below its floor, or none."""
    out = []
    ats = list(dict.fromkeys(p.at for p in points if p.judged and p.at is not None))
    for at in ats:
        here = [p for p in points if p.judged and p.at == at]
        winners = [p for p in here if p.beats_floor]
        floor = next((p.floor for p in here if p.floor is not None), None)
        if winners:
            sign = -1 if winners[0].higher_is_better else 1
            best = min(winners, key=lambda p: sign * p.error)
            out.append(Best(at, best.method, best.error, best.floor, phase, best.budget))
        else:
            out.append(Best(at, None, None, floor, phase, here[0].budget))
    return out


def cheapest_faster(points: Sequence[Point], phase: str | None) -> Faster:
    """The judged point below the floor and faster than exact with the fewest FLOPs (then the
    smallest budget); a ``Faster`` with method None (and the largest n timed) when none is."""
    fast = [p for p in points if p.judged and p.faster and p.beats_floor]
    if not fast:
        n = max((p.n for p in points if p.n is not None), default=None)
        device = next((p.device for p in points if p.device), None)
        return Faster(None, None, None, None, n, device, phase)
    best = min(fast, key=lambda p: (math.inf if p.flops is None else p.flops, p.budget or 0))
    return Faster(best.method, best.budget, best.speedup, best.error, best.n, best.device, phase)


def over_budget(points: Iterable[Point]) -> list[OverBudget]:
    """Per method, the budget where its keys per query exceed the budget by the most."""
    worst: dict[str, OverBudget] = {}
    for p in points:
        if not p.judged or p.budget is None or p.budget <= 0 or p.keys_per_query is None:
            continue
        if p.keys_per_query > p.budget:
            candidate = OverBudget(p.method, p.budget, p.keys_per_query)
            if p.method not in worst or candidate.ratio > worst[p.method].ratio:
                worst[p.method] = candidate
    return sorted(worst.values(), key=lambda o: -o.ratio)


def judge(
    points: Sequence[Point],
    metric: str,
    *,
    axis: str = "budget",
    floor_name: str = "mean-of-V floor",
    crossings: Sequence[Crossing] = (),
) -> Verdict:
    """The verdict on ``points`` (one adapter's rows), ``metric`` naming their error; ``axis``
    names what ``Point.at`` is (``budget`` or ``n``)."""
    sentences: list[str] = []
    bests: list[Best] = []
    fasts: list[Faster] = []
    over = over_budget(points)
    flagged = {o.method for o in over}
    for phase in _phases(points):
        mine = [p for p in points if phase is None or p.phase == phase]
        best = below_floor(mine, phase)
        fast = cheapest_faster(mine, phase)
        bests += best
        fasts.append(fast)
        sentences.append(
            _prefix(phase)
            + _best_sentence(best, metric, axis, floor_name, flagged)
            + _from_sentence(mine, axis)
        )
        sentences.append(_faster_sentence(fast, metric, axis, crossings, mine))
    judged = [p for p in points if p.judged and p.error is not None]
    if over:
        sentences.append(_over_sentence(over))
    return Verdict(
        tuple(s for s in sentences if s),
        metric,
        tuple(bests),
        tuple(fasts),
        tuple(over),
        all_at_or_above_floor=bool(judged) and not any(p.beats_floor for p in judged),
        crossings=tuple(crossings),
    )


def _best_sentence(
    best: Sequence[Best], metric: str, axis: str, floor_name: str, flagged: set[str]
) -> str:
    if not best:
        return "No approximation ran."
    floors = [b.floor for b in best if b.floor is not None]
    if not any(b.method for b in best):
        where = f"at every {axis}" if len(best) > 1 else f"at {axis} {_at(best[0].at, axis)}"
        value = f" ({metric} {_num(floors[0])})" if len(set(floors)) == 1 else ""
        return (
            f"Every method is at or above the {floor_name}{value} {where}: on this input, "
            "answering every query with the mean of V does as well as any of them."
        )
    same_floor = len(set(floors)) == 1
    label = f"the {floor_name} ({metric} {_num(floors[0])})" if same_floor else f"the {floor_name}"
    parts = []
    for b in best:
        mark = "*" if b.method in flagged else ""
        what = f"{b.method}{mark} ({_num(b.error)})" if b.method else "none"
        if not same_floor and b.floor is not None:
            what += f" vs {_num(b.floor)}"
        parts.append(f"{_at(b.at, axis)} {what}")
    return f"Best below {label} by {axis}: " + ", ".join(parts) + "."


def _from_sentence(points: Sequence[Point], axis: str) -> str:
    """`` First below it: kdeformer at 256, reformer at 64; never: performer.``: each judged
    method's first budget (or n) below the floor."""
    first: dict[str, int | None] = {}
    for p in points:
        if p.judged and p.error is not None:
            first.setdefault(p.method, None)
            if p.beats_floor and first[p.method] is None:
                first[p.method] = p.at
    below = [f"{m} at {_at(at, axis)}" for m, at in first.items() if at is not None]
    never = [m for m, at in first.items() if at is None]
    if not below or len(first) < 2:
        return ""
    return f" First below it: {', '.join(below)}" + (
        f"; never: {', '.join(never)}." if never else "."
    )


def _at(at: int | None, axis: str) -> str:
    return "—" if at is None else (f"{at:,}" if axis == "n" else str(at))


def _faster_sentence(
    fast: Faster, metric: str, axis: str, crossings: Sequence[Crossing], points: Sequence[Point]
) -> str:
    if fast.method is not None:
        at = f" at budget {fast.budget}" if fast.budget is not None else ""
        n = f", n = {fast.n:,}" if fast.n is not None and axis == "n" else ""
        return (
            f"Cheapest setting faster than exact and below the floor: {fast.method}{at}{n} "
            f"({fmt_speedup(fast.speedup)}, {metric} {_num(fast.error)})."
        )
    if not any(p.speedup for p in points):
        return ""  # nothing was timed (--no-timing)
    where = f" at n = {fast.n:,}" if fast.n is not None else ""
    if axis == "n" and fast.n is not None:
        where = f" up to n = {fast.n:,}"
    device = f" on {fast.device}" if fast.device else ""
    quick = [p for p in points if p.judged and p.faster]
    text = f"No setting below the floor is faster than exact{where}{device}"
    if quick:
        q = max(quick, key=lambda p: p.speedup)
        text += f" ({q.method} is {fmt_speedup(q.speedup)} but not below the floor)"
    reach = [c for c in crossings if c.n is not None]
    if reach:
        first = min(reach, key=lambda c: c.n)
        text += (
            f"; from the fitted exponents, {first.method} would be from n ≈ {_n(first.n)} "
            f"(time ∝ n^{first.exponent:.2f} against exact's n^{first.exact_exponent:.2f})"
        )
    elif crossings:
        text += "; from the fitted exponents, no method's time grows more slowly than exact's"
    return text + "."


def _over_sentence(over: Sequence[OverBudget]) -> str:
    first, rest = over[0], over[1:]
    text = (
        f"* Keys per query exceed the budget: {first.method} reads {first.keys_per_query:.4g} at "
        f"budget {first.budget} ({fmt_speedup(first.ratio)})"
    )
    if rest:
        text += ", " + ", ".join(f"{o.method} {fmt_speedup(o.ratio)}" for o in rest)
    return text + "; --budget-mode keys compares methods at equal keys per query."


# ---- adapters: one per kind of document --------------------------------------------------------


def compare_verdict(report: Any) -> Verdict:
    """The verdict on a compare document (``RunReport``): its table's rows; over a capture's
    layers, the means over layers (each layer's timing: the median of the layers' speed-ups)."""
    from kdecli.experiments.compare.report import table_rows

    metric = report.reference.primary_metric
    rows = table_rows(report)
    over_layers = [row for row in rows if row.over_layers]
    shape = report.input.shape
    points = []
    for row in over_layers or rows:
        phase = row.first.phase
        floor = _setting_floor(report, row, metric, rows)
        speedup = _setting_speedup(row, rows)
        points.append(
            Point(
                method=row.method, role=row.role, at=row.budget, error=row.error(metric),
                floor=floor, speedup=speedup, flops=row.flops,
                keys_per_query=row.keys_per_query, budget=row.budget, n=shape.n_k,
                device=row.first.environment.device, phase=phase,
            )
        )  # fmt: skip
    return judge(points, metric)


def _setting_floor(report: Any, row: Any, metric: str, rows: Sequence[Any]) -> float | None:
    """The mean floor the row is read against (over layers: the mean of the layers' floors)."""

    def floor_of(setting: Any) -> float | None:
        first = setting.first
        return report.floors_of(first.layer, first.phase).mean_floor(metric)

    if not row.over_layers:
        return floor_of(row)
    values = [floor_of(s) for s in _layer_rows(row, rows)]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _layer_rows(row: Any, rows: Sequence[Any]) -> list[Any]:
    key = row.first.setting[1:]
    return [s for s in rows if not s.over_layers and s.first.setting[1:] == key]


def _setting_speedup(row: Any, rows: Sequence[Any]) -> float | None:
    if not row.over_layers:
        return row.time.speedup if row.time is not None else None
    speedups = [s.time.speedup for s in _layer_rows(row, rows) if s.time and s.time.speedup]
    return statistics.median(speedups) if speedups else None


def scale_verdict(report: Any) -> Verdict:
    """The verdict on a scale document: below the floor per n, and where the fits say a method
    would overtake exact attention."""
    from kdecli.experiments.scale.report import rows as scale_rows

    points = []
    metrics = []
    for row in scale_rows(report):
        metrics.append(row.metric)
        points.append(
            Point(
                method=row.method, role=_role_of(report, row.method), at=row.n, error=row.error,
                floor=row.floor, speedup=row.speedup, budget=report.budget, n=row.n,
                device=report.environment.device if report.environment else None,
                phase=getattr(report, "phase", None),
            )
        )  # fmt: skip
    metric = metrics[0] if metrics else "rel_spectral"
    return judge(points, metric, axis="n", crossings=crossings(report))


def _role_of(report: Any, method: str) -> str:
    for run in report.runs:
        for record in run.results:
            if record.method == method:
                return record.role
    return "approximation"


def power_law(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares of log t = log c + α log n over (n, t): (c, α), or None under 2 lengths."""
    pts = [(math.log(n), math.log(t)) for n, t in points if n > 0 and t and t > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return math.exp(my - slope * mx), slope


def crossing(method: tuple[float, float], exact: tuple[float, float]) -> float | None:
    """The n where c_m·n^α_m = c_e·n^α_e, when exact's time grows faster (α_e > α_m)."""
    (c_m, a_m), (c_e, a_e) = method, exact
    if a_e <= a_m:
        return None
    return (c_m / c_e) ** (1 / (a_e - a_m))


def crossings(report: Any) -> list[Crossing]:
    """Per method of a scale document, the n from which it would be faster than exact."""
    exact_times = []
    for n, run in zip(report.lengths, report.runs):
        times = [r.time.exact_median for r in run.results if r.time and r.time.exact_median]
        if times:
            exact_times.append((n, times[0]))
    exact = power_law(exact_times)
    if exact is None:
        return []
    out = []
    for method in dict.fromkeys(r.method for run in report.runs for r in run.results):
        if _role_of(report, method) not in COMPETING:
            continue
        timed = [(n, r.time.method_median) for n, r in report.points(method) if r.time]
        fit = power_law([(n, t) for n, t in timed if t])
        if fit is None:
            continue
        out.append(Crossing(method, crossing(fit, exact), fit[1], exact[1]))
    return out


def drift_verdict(report: Any) -> Verdict:
    """The verdict on a drift document: the output figure (KL, or cosine for an embedding model)
    against the ``mean`` baseline's in the same layers, and the forward's speed-up."""
    next_token = report.model.output == "next-token"
    name, metric = ("kl", "KL") if next_token else ("cosine", "cosine")
    generated = getattr(report, "generate", None) is not None
    if generated:  # a --generate run: its KL is the teacher-forced one of the generated steps
        metric = "teacher-forced KL"

    def figure_of(r):
        if generated:
            return r.generation.kl if r.generation is not None else None
        return getattr(r, name)

    floor = report.floor and figure_of(report.floor)
    points = []
    for r in report.results:
        figure = figure_of(r) if r.ok else None
        points.append(
            Point(
                method=r.method, role=r.role, at=r.budget,
                error=figure.mean if figure is not None else None,
                floor=floor.mean if floor is not None else None,
                speedup=r.time.speedup if r.time is not None else None, budget=r.budget,
                n=report.tokens, device=report.environment.device,
                phase=getattr(r, "phase", None), higher_is_better=not next_token,
            )
        )  # fmt: skip
    return judge(points, metric, floor_name="mean floor")
