"""The drift document: typed records of what an approximation does to a model (``kdecli drift``).

One document (``"kind": "drift"``; ``"document"`` before kdecli 0.8) holds the run — model, text, tokens, chunks, the patched
layers, the environment — the exact model's own figures (perplexity, forward time), the ``mean``
baseline's drift in the same layers (the floor), and one result per method × budget, each figure
a ``SeedStats``: the mean ± std over its seeds (docs/metrics.md).  It is its own document, not a
``compare`` result: the figures are a model's, not an attention matrix's.  Every record's dict
form is derived from its fields (``kdecli.records``); ``load_drift`` reads a document back, and
``kdecli.experiments.documents.load_any`` reads it among every other kind.

With ``--generate T`` (``GenerationFigures``) each result holds instead what the method does to
T greedy steps after each prompt — first divergence, token agreement, and the teacher-forced KL,
top-1 agreement (also per step) and perplexity of the exact continuation — and the document names
T and the phases the method ran in.

Version history (``DRIFT_SCHEMA_VERSION``): 1, the first; 2 adds ``generate``, ``phase`` and each
result's ``generation`` (written only by a ``--generate`` run: every other document is still 1).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from kdecli import __version__
from kdecli.experiments.compare.records import read_text
from kdecli.measure.figures import Environment, ResultTime, SeedStats, TimeStat
from kdecli.records import (
    KIND,
    Reader,
    Record,
    SchemaError,
    clean,
    document_kind,
    json_field,
    write_record,
)

DOCUMENT = "drift"
DRIFT_SCHEMA_VERSION = 2
READS_VERSIONS = (1, 2)
OUTPUTS = ("next-token", "embedding")  # what the output figure is: KL/top-1/ppl, or cosine
READS_HINT = "kdecli reads the JSON that `kdecli drift --format json --output FILE` writes."


def _hidden_drift(stats: tuple[SeedStats, ...]) -> list[dict[str, Any]]:
    """Each layer's figure under its index: ``{"layer": 0, "mean": …, "std": …, "per_seed": …}``."""
    return [{"layer": i, **s.to_dict()} for i, s in enumerate(stats)]


@dataclass(frozen=True)
class GenerationFigures(Record):
    """T greedy steps after each prompt, the method's against exact attention's (the module doc of
    ``kdecli.experiments.drift.generate`` has the math).  ``first_divergence``: per seed the
    median over prompts of the first step whose token differs (0-based; T when none does:
    ``never_diverged`` of the ``generations`` never did); ``token_agreement``: the share of
    steps with the same token; ``kl``, ``top1_agreement``, ``perplexity``: teacher-forced on the
    exact generation, mean over prompts and steps, and per step (mean over prompts and seeds)."""

    steps: int
    first_divergence: SeedStats
    never_diverged: int
    generations: int
    token_agreement: SeedStats
    kl: SeedStats
    top1_agreement: SeedStats
    perplexity: SeedStats
    kl_per_step: tuple[float | None, ...] = ()
    top1_agreement_per_step: tuple[float | None, ...] = ()


@dataclass(frozen=True)
class DriftResult(Record):
    """One method × budget: its status, and the drift figures over its seeds.

    ``hidden`` has one entry per model layer l: ‖Ĥ⁽ˡ⁾ − H⁽ˡ⁾‖_F / ‖H⁽ˡ⁾‖_F over all tokens of all
    chunks (the last entry is the model's output, after its final norm where it has one).  Next-
    token models fill ``kl``, ``top1`` and ``perplexity``; embedding models ``cosine``."""

    method: str
    budget: int | None
    params: dict[str, Any] = json_field(absent={})
    role: str = json_field(absent="approximation")
    seeds: tuple[int | None, ...] = json_field()
    status: str = json_field("ok", required=True)
    reason: str | None = None
    hidden: tuple[SeedStats, ...] = json_field(
        (), name="hidden_drift", write=_hidden_drift, required=True
    )
    cosine: SeedStats | None = None
    kl: SeedStats | None = None
    top1: SeedStats | None = None
    perplexity: SeedStats | None = None
    time: ResultTime | None = None
    generation: GenerationFigures | None = json_field(None, omit="none")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def hidden_max(self) -> float | None:
        """The largest seed-mean drift over the layers."""
        means = [s.mean for s in self.hidden if s.mean is not None]
        return max(means) if means else None

    @property
    def hidden_last(self) -> float | None:
        return self.hidden[-1].mean if self.hidden else None


@dataclass(frozen=True)
class ModelInfo(Record):
    """The model as run: its folder or file name, type, layer count and what its output is."""

    source: str
    model_type: str = json_field(absent="?")
    n_layers: int = json_field()
    output: str = json_field()  # one of OUTPUTS
    pooling: str | None = None  # embedding models: "mean", "cls", ... (+ "normalize")
    config_sha256: str = ""


@dataclass(frozen=True)
class ExactRun(Record):
    """The stock model's own figures: perplexity (next-token models) and one forward's time; with
    ``--generate``, the perplexity of its own greedy continuations and one decode step's time."""

    perplexity: float | None
    time: TimeStat | None


@dataclass
class DriftReport(Record):
    """A whole drift document (results appended as the run goes)."""

    environment: Environment
    model: ModelInfo
    text: str = json_field(name="text.name")
    text_sha256: str = json_field(name="text.sha256", absent="")
    tokens: int = json_field()
    chunks: int = json_field()
    layers: list[int] = json_field()  # the patched layers
    exact: ExactRun = json_field()
    generate: int | None = json_field(None, omit="none")  # T of `--generate T`
    phase: str | None = json_field(None, omit="none")  # where the method ran: decode|prefill|both
    floor: DriftResult | None = None  # `mean` in the same layers
    results: list[DriftResult] = json_field(default_factory=list)
    kdecli_version: str = json_field(__version__, absent="?")

    json_head = {KIND: DOCUMENT, "schema_version": DRIFT_SCHEMA_VERSION}
    json_order = (
        "kdecli_version",
        "environment",
        "model",
        "text.name",
        "text.sha256",
        "tokens",
        "chunks",
        "layers",
        "generate",
        "phase",
        "exact",
        "floor",
        "results",
    )
    reads_hint = READS_HINT

    def to_dict(self) -> dict[str, Any]:
        doc = clean(write_record(self))
        if self.generate is None:  # what version 1 already held: older readers take it
            doc["schema_version"] = 1
        return doc

    @classmethod
    def read(cls, reader: Reader) -> DriftReport:
        doc, where = reader.data, reader.where
        if document_kind(doc) != DOCUMENT:
            raise SchemaError(f"{where}: is not a kdecli drift document.", hint=READS_HINT)
        version = doc.get("schema_version")
        if version not in READS_VERSIONS:
            raise SchemaError(
                f"{where}: has drift schema_version {version!r}; this kdecli ({__version__}) "
                f"reads {', '.join(map(str, READS_VERSIONS))}.",
                hint="Read it with the kdecli version that wrote it.",
            )
        return super().read(reader)

    @classmethod
    def from_dict(cls, doc: Any, where: str = "document", path: str = "") -> DriftReport:
        if not isinstance(doc, dict):
            raise SchemaError(f"{where}: is not a kdecli drift document.", hint=READS_HINT)
        return super().from_dict(doc, where, path)


def drift_json(report: DriftReport) -> str:
    return json.dumps(report.to_dict(), indent=2, allow_nan=False)


def load_drift(path: str | os.PathLike) -> DriftReport:
    """Read a drift document written by ``kdecli drift --format json``."""
    try:
        doc = json.loads(read_text(path, READS_HINT))
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: is not JSON ({exc}).", hint=READS_HINT) from None
    return DriftReport.from_dict(doc, str(path))
