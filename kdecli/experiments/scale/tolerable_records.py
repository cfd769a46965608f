"""The records of ``kdecli scale --target-error E``: the smallest budget meeting E at each length.

A ``TolerableSearch`` (the ``tolerable`` entry of a scale document) holds the target, the rule a
budget must meet (``criterion``: the mean over batch×head slices, or every slice), how the grid
was searched, every point it measured (``Probe``: one method × budget × length, its error as the
mean over seeds) and per method × length the answer (``Tolerable``): the smallest budget of the
grid meeting E, with its density budget / n, or None when even the grid's largest misses E.

Version history: added in kdecli 0.8 within scale schema version 1 (a document without it is a
time-and-error scale document, as before).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdecli.measure.figures import Environment, InputInfo, ReferenceInfo
from kdecli.records import Record, json_field

CRITERIA = ("mean", "every head")  # the slice-mean error meets E, or every slice's does
SEARCHES = ("bisect", "all")  # bisection on the sorted grid, or every grid value measured


@dataclass(frozen=True)
class Probe(Record):
    """One method at one budget at one length: what it measured.

    ``error``: the seed-mean of each record's slice-mean (the figure of the tables);
    ``worst_head``: the largest slice of the seed-mean per slice.  ``meets``: the figure the
    criterion reads is at most the target (never for a probe that failed)."""

    n: int
    method: str
    budget: int
    status: str  # "ok", or the first failing seed's status
    error: float | None
    worst_head: float | None
    meets: bool
    per_seed: tuple[float | None, ...] = ()
    keys_per_query: float | None = None  # as the records count it (realised where measured)
    # with --diagnostics: the seed-mean of the measured density (kept over allowed keys) and of
    # the attention mass the kept keys carry
    density: float | None = json_field(None, omit="none")
    mass_recall: float | None = json_field(None, omit="none")
    reason: str | None = json_field(None, omit="none")


@dataclass(frozen=True)
class Tolerable(Record):
    """A method's smallest budget meeting the target at length ``n`` (None: even ``largest``,
    the grid's largest budget at this n, misses it).

    ``density`` = budget / n (keys per query over the length; under the causal mask a query at
    position i is allowed i + 1 keys, (n + 1) / 2 on average).  ``below_grid``: the grid's
    smallest budget meets E, so the tolerable budget may be smaller still.  ``monotone``: the
    probes agree with an error that falls as the budget grows (bisection assumes it)."""

    n: int
    method: str
    budget: int | None
    density: float | None
    error: float | None  # the criterion's figure at ``budget``
    largest: int
    below_grid: bool = False
    monotone: bool = True
    reason: str | None = json_field(None, omit="none")  # why none: the largest budget's failure


@dataclass(frozen=True)
class LengthInfo(Record):
    """One length as measured: the cropped (or drawn) input, its reference and mean floor."""

    n: int
    input: InputInfo
    reference: ReferenceInfo
    floor: float | None  # the error of answering every query with the mean of V


@dataclass
class TolerableSearch(Record):
    """The target, the search and everything it measured (module docstring)."""

    target_error: float
    metric: str  # rel_spectral (full reference) or rel_frobenius (a row sample)
    criterion: str = json_field("mean", choices=CRITERIA)
    search: str = json_field("bisect", choices=SEARCHES)
    grid: list[int] | None = None  # as given; None: powers of two from 16 up to n, and n
    methods: list[str] = json_field(default_factory=list)
    lengths: list[LengthInfo] = json_field(default_factory=list)
    probes: list[Probe] = json_field(default_factory=list)
    budgets: list[Tolerable] = json_field(default_factory=list)
    environment: Environment | None = None

    def answer(self, method: str, n: int) -> Tolerable | None:
        """The method's answer at length n (None: not reached, e.g. an interrupted run)."""
        return next((t for t in self.budgets if t.method == method and t.n == n), None)

    def probes_of(self, method: str, n: int) -> list[Probe]:
        """The points measured for the method at length n, by budget."""
        return sorted(
            (p for p in self.probes if p.method == method and p.n == n), key=lambda p: p.budget
        )
