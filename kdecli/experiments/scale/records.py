"""The scale document: every length's ``compare`` run and the fitted exponents (``kdecli scale``).

One document (``"kind": "scale"``; ``"document"`` before kdecli 0.8) holds the input, the budget, the phase, the lengths that
ran, one whole compare document per length (``runs``) and per method (and for exact attention) the
fit of time ≈ c·n^α (``fits``).  ``kdecli.experiments.documents.load_any`` reads it back.

Under ``phase`` "decode" a length is a cache length n_k: each run measures ``queries`` decode
queries at the last positions (one decode step), timed as a step with the cache's preparation
apart and amortised over ``steps`` steps.

Under ``--target-error`` the document answers another question, each method's smallest budget
meeting the target at each length (``tolerable``, ``kdecli.experiments.scale.tolerable``): it
then holds no ``runs`` and no ``fits`` (no time is measured), and ``budget`` is null.

Version history (``SCALE_SCHEMA_VERSION``): 1, the first; kdecli 0.8 adds ``phase`` (absent reads
as "prefill") and, for decode, ``queries`` and ``steps``, and ``tolerable`` (absent: a time and
error document), within version 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdecli import __version__
from kdecli.experiments.compare.records import Result, RunReport
from kdecli.experiments.scale.tolerable_records import TolerableSearch
from kdecli.measure.figures import Environment
from kdecli.records import KIND, Reader, Record, SchemaError, document_kind, json_field

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
    phase: str = json_field("prefill", choices=("prefill", "decode"))
    queries: int | None = json_field(None, omit="none")  # decode: queries per step (M)
    steps: int | None = json_field(None, omit="none")  # decode: a preparation amortised over
    runs: list[RunReport] = json_field(default_factory=list, required=True)
    fits: dict[str, Fit] = json_field(default_factory=dict, required=True)  # method, "exact"
    tolerable: TolerableSearch | None = json_field(None, omit="none")  # --target-error
    environment: Environment | None = json_field(None, skip=True)
    interrupted: bool = False
    kdecli_version: str = __version__

    json_head = {KIND: DOCUMENT, "schema_version": SCALE_SCHEMA_VERSION}
    json_order = (
        "kdecli_version",
        "input",
        "budget",
        "phase",
        "queries",
        "steps",
        "lengths",
        "interrupted",
        "fits",
        "tolerable",
        "runs",
    )
    reads_hint = READS_HINT

    @classmethod
    def read(cls, reader: Reader) -> ScaleReport:
        doc, where = reader.data, reader.where
        if document_kind(doc) != DOCUMENT:
            raise SchemaError(
                f'{where}: is not a `kdecli scale` document (no "kind": "scale").',
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
        elif report.tolerable is not None:
            report.environment = report.tolerable.environment
        return report

    @classmethod
    def from_dict(cls, doc: Any, where: str = "document", path: str = "") -> ScaleReport:
        if not isinstance(doc, dict):
            raise SchemaError(
                f'{where}: is not a `kdecli scale` document (no "kind": "scale").',
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
