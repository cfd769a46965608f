"""The drift document: typed records of what an approximation does to a model (``kdecli drift``).

One document (``"document": "drift"``) holds the run — model, text, tokens, chunks, the patched
layers, the environment — the exact model's own figures (perplexity, forward time), the ``mean``
baseline's drift in the same layers (the floor), and one result per method × budget, each figure
the mean ± std over its seeds (ALGORITHMS.md 11).  It is its own document, not a ``compare``
result: the figures are a model's, not an attention matrix's.  ``load_drift`` reads it back.

Version history (``DRIFT_SCHEMA_VERSION``): 1, the first.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdecli import __version__
from kdecli.experiments.compare.records import (
    Environment,
    ResultTime,
    SchemaError,
    TimeStat,
    _Reader,
    clean,
)

DOCUMENT = "drift"
DRIFT_SCHEMA_VERSION = 1
OUTPUTS = ("next-token", "embedding")  # what the output figure is: KL/top-1/ppl, or cosine
READS_HINT = "kdecli reads the JSON that `kdecli drift --format json --output FILE` writes."


@dataclass(frozen=True)
class SeedStat:
    """One figure over seeds: mean, sample std (0 for one seed), every seed's value.

    (``results.Summary`` is over batch×head slices and keeps a max; over seeds the std is what a
    reader needs.)"""

    mean: float | None
    std: float | None
    per_seed: tuple[float | None, ...] = ()

    @classmethod
    def of(cls, values: list[float]) -> SeedStat:
        if not values:
            return cls(None, None, ())
        if not all(math.isfinite(v) for v in values):
            return cls(math.inf, None, tuple(values))
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, tuple(values))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "per_seed": list(self.per_seed)}

    @classmethod
    def from_dict(cls, r: _Reader) -> SeedStat:
        values = r.data.get("per_seed") or []
        return cls(
            r.number("mean", None),
            r.number("std", None),
            tuple(None if v is None else float(v) for v in values),
        )


def _optional_stat(r: _Reader, key: str) -> SeedStat | None:
    child = r.optional_child(key)
    return None if child is None else SeedStat.from_dict(child)


@dataclass(frozen=True)
class DriftResult:
    """One method × budget: its status, and the drift figures over its seeds.

    ``hidden`` has one entry per model layer l: ‖Ĥ⁽ˡ⁾ − H⁽ˡ⁾‖_F / ‖H⁽ˡ⁾‖_F over all tokens of all
    chunks (the last entry is the model's output, after its final norm where it has one).  Next-
    token models fill ``kl``, ``top1`` and ``perplexity``; embedding models ``cosine``."""

    method: str
    budget: int | None
    params: dict[str, Any]
    role: str
    seeds: tuple[int | None, ...]
    status: str = "ok"
    reason: str | None = None
    hidden: tuple[SeedStat, ...] = ()
    cosine: SeedStat | None = None
    kl: SeedStat | None = None
    top1: SeedStat | None = None
    perplexity: SeedStat | None = None
    time: ResultTime | None = None

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

    def to_dict(self) -> dict[str, Any]:
        def stat(s: SeedStat | None):
            return None if s is None else s.to_dict()

        return {
            "method": self.method,
            "budget": self.budget,
            "params": self.params,
            "role": self.role,
            "seeds": list(self.seeds),
            "status": self.status,
            "reason": self.reason,
            "hidden_drift": [{"layer": i, **s.to_dict()} for i, s in enumerate(self.hidden)],
            "cosine": stat(self.cosine),
            "kl": stat(self.kl),
            "top1": stat(self.top1),
            "perplexity": stat(self.perplexity),
            "time": None if self.time is None else self.time.to_dict(),
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> DriftResult:
        hidden = r.list("hidden_drift")
        time = r.optional_child("time")
        return cls(
            method=r.str("method"),
            budget=r.int("budget", None),
            params=r.dict("params", {}),
            role=r.str("role", "approximation"),
            seeds=tuple(r.list("seeds")),
            status=r.str("status"),
            reason=r.str("reason", None),
            hidden=tuple(
                SeedStat.from_dict(_Reader(item, r.where, f"{r.path}.hidden_drift[{i}]"))
                for i, item in enumerate(hidden)
            ),
            cosine=_optional_stat(r, "cosine"),
            kl=_optional_stat(r, "kl"),
            top1=_optional_stat(r, "top1"),
            perplexity=_optional_stat(r, "perplexity"),
            time=None if time is None else ResultTime.from_dict(time),
        )


@dataclass(frozen=True)
class ModelInfo:
    """The model as run: its folder or file name, type, layer count and what its output is."""

    source: str
    model_type: str
    n_layers: int
    output: str  # one of OUTPUTS
    pooling: str | None = None  # embedding models: "mean", "cls", ... (+ "normalize")
    config_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "output": self.output,
            "pooling": self.pooling,
            "config_sha256": self.config_sha256,
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> ModelInfo:
        return cls(
            r.str("source"),
            r.str("model_type", "?"),
            r.int("n_layers"),
            r.str("output"),
            r.str("pooling", None),
            r.str("config_sha256", ""),
        )


@dataclass(frozen=True)
class ExactRun:
    """The stock model's own figures: perplexity (next-token models) and one forward's time."""

    perplexity: float | None
    time: TimeStat | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity,
            "time": None if self.time is None else self.time.to_dict(),
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> ExactRun:
        time = r.optional_child("time")
        return cls(r.number("perplexity", None), None if time is None else TimeStat.from_dict(time))


@dataclass
class DriftReport:
    """A whole drift document (results appended as the run goes)."""

    environment: Environment
    model: ModelInfo
    text: str
    text_sha256: str
    tokens: int
    chunks: int
    layers: list[int]  # the patched layers
    exact: ExactRun
    floor: DriftResult | None = None  # `mean` in the same layers
    results: list[DriftResult] = field(default_factory=list)
    kdecli_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return clean(
            {
                "document": DOCUMENT,
                "schema_version": DRIFT_SCHEMA_VERSION,
                "kdecli_version": self.kdecli_version,
                "environment": self.environment.to_dict(),
                "model": self.model.to_dict(),
                "text": {"name": self.text, "sha256": self.text_sha256},
                "tokens": self.tokens,
                "chunks": self.chunks,
                "layers": list(self.layers),
                "exact": self.exact.to_dict(),
                "floor": None if self.floor is None else self.floor.to_dict(),
                "results": [r.to_dict() for r in self.results],
            }
        )

    @classmethod
    def from_dict(cls, doc: Any, where: str = "document") -> DriftReport:
        if not isinstance(doc, dict) or doc.get("document") != DOCUMENT:
            raise SchemaError(f"{where}: is not a kdecli drift document.", hint=READS_HINT)
        version = doc.get("schema_version")
        if version != DRIFT_SCHEMA_VERSION:
            raise SchemaError(
                f"{where}: has drift schema_version {version!r}; this kdecli ({__version__}) "
                f"reads {DRIFT_SCHEMA_VERSION}.",
                hint="Read it with the kdecli version that wrote it.",
            )
        top = _Reader(doc, where, "")
        text = top.child("text")
        floor = top.optional_child("floor")
        return cls(
            environment=Environment.from_dict(top.child("environment")),
            model=ModelInfo.from_dict(top.child("model")),
            text=text.str("name"),
            text_sha256=text.str("sha256", ""),
            tokens=top.int("tokens"),
            chunks=top.int("chunks"),
            layers=[int(i) for i in top.list("layers")],
            exact=ExactRun.from_dict(top.child("exact")),
            floor=None if floor is None else DriftResult.from_dict(floor),
            results=[
                DriftResult.from_dict(_Reader(item, where, f"results[{i}]"))
                for i, item in enumerate(top.list("results"))
            ],
            kdecli_version=top.str("kdecli_version", "?"),
        )


def drift_json(report: DriftReport) -> str:
    return json.dumps(report.to_dict(), indent=2, allow_nan=False)


def load_drift(path: str | os.PathLike) -> DriftReport:
    """Read a drift document written by ``kdecli drift --format json``."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such file.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: is not JSON ({exc}).", hint=READS_HINT) from None
    return DriftReport.from_dict(doc, str(path))
