"""The scale document: every length's ``compare`` run and the fitted exponents (``kdecli scale``).

One document (``"document": "scale"``) holds the input, the budget, the lengths that ran, one whole
compare document per length (``runs``) and per method (and for exact attention) the fit of
time ≈ c·n^α (``fits``).  ``kdecli.experiments.documents.load_any`` reads it back.

Version history (``SCALE_SCHEMA_VERSION``): 1, the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdecli import __version__
from kdecli.experiments.compare.records import Result, RunReport
from kdecli.measure.figures import Environment
from kdecli.records import Reader, Record, SchemaError, json_field

DOCUMENT = "scale"
SCALE_SCHEMA_VERSION = 1
READS_HINT = "kdecli reads the JSON that `kdecli scale --format json --output FILE` writes."


@dataclass(frozen=True)
class Fit(Record):
    """time ≈ c·n^exponent over ``points`` lengths (from ``n_min`` to ``n_max``)."""

    exponent: float | None
    points: int
    n_min: int | None
    n_max: int | None
    note: str | None = json_field(None, omit="falsy")


@dataclass
class ScaleReport(Record):
    """Every length's run (a whole ``RunReport`` each) and the fitted exponents per method;
    ``environment`` is the first run's (not written: each run holds its own)."""

    input: str
    budget: int | None = json_field(required=True)
    lengths: list[int] = json_field()
    runs: list[RunReport] = json_field(default_factory=list, required=True)
    fits: dict[str, Fit] = json_field(default_factory=dict, required=True)  # method, "exact"
    environment: Environment | None = json_field(None, skip=True)
    interrupted: bool = False
    kdecli_version: str = __version__

    json_head = {"document": DOCUMENT, "schema_version": SCALE_SCHEMA_VERSION}
    json_order = ("kdecli_version", "input", "budget", "lengths", "interrupted", "fits", "runs")
    reads_hint = READS_HINT

    @classmethod
    def read(cls, reader: Reader) -> ScaleReport:
        doc, where = reader.data, reader.where
        if doc.get("document") != DOCUMENT:
            raise SchemaError(
                f'{where}: is not a `kdecli scale` document (no "document": "scale").',
                hint=READS_HINT,
            )
        version = doc.get("schema_version")
        if version != SCALE_SCHEMA_VERSION:
            raise SchemaError(
                f"{where}: has scale schema_version {version!r}; this kdecli ({__version__}) "
                f"reads {SCALE_SCHEMA_VERSION}.",
                hint="Read it with the kdecli version that wrote it.",
            )
        report = super().read(reader)
        if report.runs:
            report.environment = report.runs[0].environment
        return report

    @classmethod
    def from_dict(cls, doc: Any, where: str = "document", path: str = "") -> ScaleReport:
        if not isinstance(doc, dict):
            raise SchemaError(
                f'{where}: is not a `kdecli scale` document (no "document": "scale").',
                hint=READS_HINT,
            )
        return super().from_dict(doc, where, path)

    def points(self, method: str) -> list[tuple[int, Result]]:
        """(n, the method's first ok record) for every length where it ran."""
        out = []
        for n, run in zip(self.lengths, self.runs):
            ok = [r for r in run.results if r.method == method and r.ok]
            if ok:
                out.append((n, ok[0]))
        return out
