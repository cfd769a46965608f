"""The compare document: typed records for one run and its results, and its JSON and JSONL forms.

A document (``--format json``) is a run header — schema version, kdecli version, the environment,
the input, the floors — and a list of results, one per method × budget × seed; ``--format jsonl``
writes the header as a ``{"type": "run"}`` line and each result as a ``{"type": "result"}`` line.
A run over several layers of a capture also has ``layers`` (each layer's input and floors; in
JSONL a ``{"type": "layer"}`` line before that layer's results), and each result its ``layer``.
Every record's ``to_dict`` and ``from_dict`` are derived from its fields (``kdecli.records``);
``load_document`` reads either form and checks it, naming the file and the field at fault.  The
records the measuring kernel produces (``Environment``, ``InputInfo``, ``Floors``,
``ReferenceInfo``, ``Summary``, ``ResultTime``, ``TimeStat``) live in ``kdecli.measure.figures``;
this module defines the compare document around them.

Version history (``SCHEMA_VERSION`` is defined here and nowhere else):
  1  the first release.
  2  each result keeps its own ``environment`` (the machine it ran on), so a document merged from
     several machines stays true; each result declares its method's ``role`` and its ``layer``
     (null but for captures), and runs over layers list them in ``layers``.  Version-1 documents
     still load: their results take the header's environment, and roles come from the registry.
     kdecli 0.4 adds, within version 2 (older documents load with the defaults): per result
     ``keys_per_query``, ``flops_fraction``, ``budget_mode``; per time ``calls_per_sample``,
     ``min_time``, ``memory_source``, ``extrapolated`` and ``extrapolated_rows``.
     From kdecli 0.4 a document may say which exact reference it used (``reference``: full, or
     a sample of query rows whose errors are estimates with ``interval``s); optional, and absent
     means full, so the version stays 2.
     kdecli 0.5 adds, within version 2, per time (``--backward``; written only when set):
     ``backward_s``, ``exact_backward_s``, ``backward_speedup`` and ``backward_note``.
     kdecli 0.6 adds, within version 2, per result its job ``key``, and per document its
     ``grid`` and (merged documents) ``merge``; per input ``query_offset`` (written when not 0).
     kdecli 0.8 adds, within version 2, per result its ``phase`` ("prefill" or "decode"; absent
     reads as prefill), per input ``phase``, ``queries`` and ``note`` (written for decode), and
     ``layers`` for a run over both phases (one part per layer × phase).
     kdecli 0.9 adds, within version 2, per result its ``diagnostics`` (density, mass_recall,
     selection_error, estimation_error, lse_error, note: ``kdecli.measure.figures``),
     written only where they were computed; and per ``pareto`` its ``every_head`` (``--every-head``:
     the picks' worst heads meet the target; written when set).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdecli import __version__
from kdecli.measure.figures import (
    Diagnostics,
    Environment,
    Floors,
    InputInfo,
    ReferenceInfo,
    ResultTime,
    Summary,
)
from kdecli.records import (
    KIND,
    MISSING,
    Place,
    Reader,
    Record,
    SchemaError,
    clean,
    document_kind,
    json_field,
    read_record,
    write_record,
)
from kdecli.sweeps.grid import GridInfo, JobEntry

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("ok", "unsupported", "oom", "error")
READS_HINT = (
    "kdecli reads the JSON or JSONL that `kdecli compare --format json|jsonl --output FILE` writes."
)


def _legacy_role(reader: Reader) -> str:
    """Version-1 results carry no role: the registry's declaration, else what the record says."""
    from kdecli.methods import get_method_class, method_names

    method = reader.str("method")
    if method in method_names():
        return get_method_class(method).role
    return "oracle" if reader.bool("oracle", False) else "approximation"


def _header_environment(reader: Reader) -> Any:
    """Version-1 results carry no environment: the document header's."""
    return reader.place.context.get("environment", MISSING)


@dataclass(frozen=True)
class Result(Record):
    """One method × budget × seed: what ran, how it went, its errors, time and cost."""

    method: str
    budget: int | None
    seed: int | None
    params: dict[str, Any] = json_field(absent={})
    role: str = json_field(migrate=_legacy_role)
    estimates: str = json_field(absent="softmax")
    status: str = json_field(choices=STATUSES)
    reason: str | None = json_field()
    errors: dict[str, Summary] = json_field(absent={})
    time: ResultTime | None = json_field()
    flops: float | None = json_field()
    beats_mean_floor: bool | None = json_field()
    environment: Environment = json_field(migrate=_header_environment)
    layer: int | None = None  # the model layer of a capture's input; None for a plain input
    # what a query pays: keys (or features) per query, the FLOPs over exact attention's at the
    # same shape (causal-aware), and how the budget was mapped ("paper" or "keys")
    keys_per_query: float | None = None
    flops_fraction: float | None = None
    budget_mode: str = "paper"
    # what was measured: every query ("prefill"), or the last M queries, each over its own prefix
    # ("decode"; M is the input's ``queries``); documents before 0.8 are prefill
    phase: str = json_field("prefill", choices=("prefill", "decode"))
    # the record's stable job key (``kdecli.sweeps.grid``): what resume and merge match records by
    key: str | None = json_field(None, omit="none")
    # why the estimate is wrong (``--diagnostics``): absent where they were not computed
    diagnostics: Diagnostics | None = json_field(None, omit="none")

    json_order = (
        "method",
        "budget",
        "seed",
        "params",
        "role",
        "oracle",
        "estimates",
        "status",
        "reason",
        "errors",
        "diagnostics",
        "time",
        "flops",
        "keys_per_query",
        "flops_fraction",
        "budget_mode",
        "beats_mean_floor",
        "environment",
        "layer",
        "phase",
        "key",
    )

    @property
    def oracle(self) -> bool:
        return self.role == "oracle"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def setting(self) -> tuple[int | None, str, str, int | None, str]:
        """The key that groups a setting's seeds: layer, phase, method, budget, resolved
        parameters."""
        params = json.dumps(self.params, sort_keys=True, default=str)
        return (self.layer, self.phase, self.method, self.budget, params)

    def error(self, metric: str) -> float | None:
        summary = self.errors.get(metric)
        return None if summary is None else summary.mean


@dataclass(frozen=True)
class ParetoPick(Record):
    """A method's cheapest setting that reaches the target error (written under the metric's
    name: ``{"rel_spectral": 0.04}``)."""

    budget: int | None
    params: dict[str, Any] = json_field(absent={})
    flops: float | None = json_field()
    error: float = json_field()
    method_s: float | None = json_field()

    def to_dict(self, metric: str = "error") -> dict[str, Any]:
        return {metric if key == "error" else key: v for key, v in write_record(self).items()}

    @classmethod
    def read_as(cls, reader: Reader, metric: str) -> ParetoPick:
        return read_record(cls, reader, error=reader.number(metric))


@dataclass(frozen=True)
class Pareto(Record):
    """``--target-error``: per method (in order of first appearance), its cheapest setting or None."""

    target_error: float
    metric: str = json_field(absent="rel_spectral")
    methods: dict[str, ParetoPick | None] = json_field(absent={})
    # ``--every-head``: each pick's worst head (over every layer) meets the target, not its mean
    every_head: bool = json_field(False, omit="falsy")

    def to_dict(self) -> dict[str, Any]:
        picks = {
            name: None if pick is None else pick.to_dict(self.metric)
            for name, pick in self.methods.items()
        }
        return write_record(self, exclude=("methods",)) | {"methods": picks}

    @classmethod
    def read(cls, reader: Reader) -> Pareto:
        metric = reader.str("metric", "rel_spectral")
        picks = {
            name: None if pick is None else ParetoPick.read_as(Reader(pick, place), metric)
            for name, pick in reader.dict("methods", {}).items()
            for place in [reader.place.at(f"methods.{name}")]
        }
        return read_record(cls, reader, metric=metric, methods=picks)


@dataclass(frozen=True)
class LayerInfo(Record):
    """One part of a run over a capture's layers or over both phases: the layer, its input as
    run (whose ``phase`` says which phase the part measured) and its floors."""

    layer: int | None
    input: InputInfo
    floors: Floors

    @property
    def part(self) -> tuple[int | None, str]:
        return (self.layer, self.input.phase)


@dataclass(frozen=True)
class Conflict(Record):
    """Records of one job key whose measurements disagree (``kdecli merge``): the kept one is
    among the results; ``records`` holds the others, so a later merge sees them again."""

    key: str
    job: JobEntry | None
    records: tuple[Result, ...]


@dataclass(frozen=True)
class MergeInfo(Record):
    """What ``kdecli merge`` found: the grid's records no part holds, and the conflicts."""

    missing: tuple[JobEntry, ...] = ()
    conflicts: tuple[Conflict, ...] = ()


_BODY = ("layers", "results", "pareto", "merge")  # what a JSONL stream writes as lines of its own


@dataclass
class RunReport(Record):
    """A whole document: the run header and its results (appended as the run goes)."""

    environment: Environment
    input: InputInfo
    floors: Floors
    results: list[Result] = json_field(default_factory=list)
    pareto: Pareto | None = json_field(None, omit="none")
    kdecli_version: str = json_field(__version__, absent="?")
    # the run was stopped: ``results`` holds what finished
    interrupted: bool = json_field(False, omit="falsy")
    # a run over several layers of a capture, or over both phases: each part's input and floors
    # (``input`` and ``floors`` above are the first part's)
    layers: list[LayerInfo] = json_field(default_factory=list, omit="falsy")
    # the exact reference: every query, or a sample of rows (documents before 0.4: full)
    reference: ReferenceInfo = ReferenceInfo()
    # the job grid the run belongs to, and which shard of it this was (``kdecli.sweeps.grid``)
    grid: GridInfo | None = json_field(None, omit="none")
    # a merged document: what the merge found (``kdecli.sweeps.merge``)
    merge: MergeInfo | None = json_field(None, omit="none")

    json_head = {KIND: "compare", "schema_version": SCHEMA_VERSION}
    json_order = (
        "kdecli_version",
        "environment",
        "input",
        "floors",
        "reference",
        "interrupted",
        "grid",
        *_BODY,
    )
    reads_hint = READS_HINT

    def floors_of(self, layer: int | None, phase: str = "prefill") -> Floors:
        """The floors that a result of ``layer`` and ``phase`` is measured against."""
        return next((x.floors for x in self.layers if x.part == (layer, phase)), self.floors)

    @property
    def phases(self) -> tuple[str, ...]:
        """The phases this document measured, in order of first appearance."""
        parts = [x.input.phase for x in self.layers] or [self.input.phase]
        return tuple(dict.fromkeys(parts + [r.phase for r in self.results]))

    def header_dict(self) -> dict[str, Any]:
        """Everything but the results and the Pareto picks: the first line of a JSONL stream."""
        return write_record(self, exclude=_BODY)

    def to_dict(self) -> dict[str, Any]:
        return clean(write_record(self))

    as_dict = to_dict  # the name of kdecli 0.1

    @classmethod
    def read(cls, reader: Reader) -> RunReport:
        """Check and read a JSON document of any readable schema version."""
        doc, where = reader.data, reader.where
        if reader.path:  # a run inside another document (a scale document's runs)
            where = f"{where}: `{reader.path}`"
        kind = document_kind(doc)
        if kind == "inspect":
            raise SchemaError(
                f"{where}: is a `kdecli inspect` report, not `kdecli compare` results.",
                hint=READS_HINT,
            )
        if isinstance(kind, str) and kind != "compare":  # a scale or drift document
            raise SchemaError(
                f"{where}: is a `kdecli {kind}` document, not `kdecli compare` results.",
                hint=READS_HINT,
            )
        required = ("schema_version", "input", "environment", "floors", "results")
        missing = [key for key in required if key not in doc]
        if missing:
            raise SchemaError(
                f"{where}: is not a kdecli result document; it lacks {', '.join(missing)}.",
                hint=READS_HINT,
            )
        version = doc["schema_version"]
        if version not in READABLE_VERSIONS:
            raise SchemaError(
                f"{where}: has schema_version {version!r}; this kdecli ({__version__}) reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}.",
                hint="Read it with the kdecli version that wrote it.",
            )
        environment = Environment.read(reader.child("environment"))
        # version-1 results take the header's environment (``Result.environment``)
        place = Place(reader.where, reader.path, reader.place.hint, {"environment": environment})
        return read_record(cls, Reader(doc, place), environment=environment)

    @classmethod
    def from_dict(cls, doc: Any, where: str = "document", path: str = "") -> RunReport:
        if not isinstance(doc, dict):
            raise SchemaError(
                f"{where}: holds a JSON {type(doc).__name__}; expected a kdecli result document "
                "(an object with input, environment, floors and results).",
                hint=READS_HINT,
            )
        return super().from_dict(doc, where, path)


# ---- files ---------------------------------------------------------------------------------------


def load_document(path: str | os.PathLike) -> RunReport:
    """Read a results file: a JSON document or a JSONL stream (run line, result lines, pareto)."""
    return parse_document(read_text(path), path)


def read_text(path: str | os.PathLike, hint: str = READS_HINT) -> str:
    """A document file's text, or a ``SchemaError`` that says why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(
            f"{path}: no such file." if not path.exists() else f"{path}: is not a file."
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: is not a text file.", hint=hint) from None
    except OSError as exc:
        raise SchemaError(f"{path}: cannot be read ({exc.strerror}).") from None


def parse_document(text: str, path: str | os.PathLike) -> RunReport:
    """``load_document`` of a file's text; ``path`` names it in messages."""
    path = Path(path)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SchemaError(f"{path}: is empty.", hint=READS_HINT)
    if lines[0].startswith("method,budget,"):
        raise SchemaError(
            f"{path}: is the CSV of `kdecli compare`; it keeps too little to be read back; "
            "use its JSON or JSONL.",
            hint=READS_HINT,
        )
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if isinstance(first, dict) and first.get("type") == "run":
        if not text.endswith("\n") and len(lines) > 1 and not _is_json(lines[-1]):
            lines = lines[:-1]  # a line cut short by a crash: the records before it stand
        doc = _from_jsonl(lines, path)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SchemaError(
                f"{path}: is not JSON (line {exc.lineno}: {exc.msg}).", hint=READS_HINT
            ) from None
    return RunReport.from_dict(doc, str(path))


def _from_jsonl(lines: list[str], path: Path) -> dict[str, Any]:
    head: dict[str, Any] = {}
    results, layers, pareto = [], [], None
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SchemaError(
                f"{path}: line {number} is not JSON ({exc.msg}).", hint=READS_HINT
            ) from None
        kind = item.get("type") if isinstance(item, dict) else None
        body = {key: value for key, value in item.items() if key != "type"} if kind else None
        if number == 1:
            head = body
        elif kind == "result":
            results.append(body)
        elif kind == "layer":
            layers.append(body)
        elif kind == "pareto":
            pareto = body
        else:
            raise SchemaError(
                f"{path}: line {number} is not a result (type {kind!r}); after the first "
                '{"type": "run"} line every line must be {"type": "result", ...}.',
                hint=READS_HINT,
            )
    doc = {**head, "results": latest_per_key(results)}
    if layers:
        doc["layers"] = list({_part(layer): layer for layer in reversed(layers)}.values())[
            ::-1
        ]  # a resumed run announces a layer again: its first announcement stands
    if pareto is not None:
        doc["pareto"] = pareto
    return doc


def _part(layer: Any) -> Any:
    """A layer line's part: its layer and phase (a malformed line is checked when read)."""
    if not isinstance(layer, dict):
        return id(layer)
    info = layer.get("input")
    phase = info.get("phase", "prefill") if isinstance(info, dict) else None
    return (json.dumps(layer.get("layer")), json.dumps(phase))


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def latest_per_key(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A resumed run appends the retry of a failed record after it: per job key, the last ``ok``
    record stands (else the last one), in the place of the key's first record.  Records without
    a key (files before kdecli 0.6) all stand."""
    chosen: dict[str, dict[str, Any]] = {}
    for record in results:
        key = record.get("key") if isinstance(record, dict) else None
        previous = chosen.get(key)
        if key is not None and (
            previous is None or record.get("status") == "ok" or previous.get("status") != "ok"
        ):
            chosen[key] = record
    out, placed = [], set()
    for record in results:
        key = record.get("key") if isinstance(record, dict) else None
        if key is None:
            out.append(record)
        elif key not in placed:
            placed.add(key)
            out.append(chosen[key])
    return out


def to_json(report: RunReport) -> str:
    """The JSON document, with the verdict printed under its table as ``summary``: computed from
    the results, so written, never read back (``kdecli.experiments.verdict``)."""
    from kdecli.experiments.verdict import compare_verdict  # it reads the table's rows

    doc = report.to_dict()
    doc["summary"] = compare_verdict(report).to_dict()
    return json.dumps(doc, indent=2, allow_nan=False)


def jsonl_header(report: RunReport) -> str:
    return json.dumps(clean({"type": "run", **report.header_dict()}), allow_nan=False)


def jsonl_layer(layer: LayerInfo) -> str:
    """Before the results of each layer of a run over a capture: ``{"type": "layer", ...}``."""
    return json.dumps(clean({"type": "layer", **layer.to_dict()}), allow_nan=False)


def jsonl_result(result: Result) -> str:
    return json.dumps(clean({"type": "result", **result.to_dict()}), allow_nan=False)


def jsonl_pareto(pareto: Pareto) -> str:
    return json.dumps(clean({"type": "pareto", **pareto.to_dict()}), allow_nan=False)
