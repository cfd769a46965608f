"""The result schema: typed records for one run and its results, written and read in one place.

A document (``--format json``) is a run header — schema version, kdecli version, the environment,
the input, the floors — and a list of results, one per method × budget × seed; ``--format jsonl``
writes the header as a ``{"type": "run"}`` line and each result as a ``{"type": "result"}`` line.
A run over several layers of a capture also has ``layers`` (each layer's input and floors; in
JSONL a ``{"type": "layer"}`` line before that layer's results), and each result its ``layer``.
Every record has ``to_dict`` and ``from_dict``; ``load_document`` reads either form and checks it,
naming the file and the field at fault.

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
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdecli import __version__
from kdecli.errors import UsageError
from kdecli.sweeps.grid import GridInfo, JobEntry

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("ok", "unsupported", "oom", "error")
READS_HINT = (
    "kdecli reads the JSON or JSONL that `kdecli compare --format json|jsonl --output FILE` writes."
)


class SchemaError(UsageError):
    """A results file that is not a kdecli result document; the message names the file and field."""


def clean(value: Any) -> Any:
    """NaN and ±inf become None, recursively, so what is written is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


# ---- reading fields with messages that name them -------------------------------------------------


class _Reader:
    """Reads the fields of one JSON object; every complaint names the file and the field's path."""

    def __init__(self, data: Any, where: str, path: str):
        if not isinstance(data, dict):
            raise SchemaError(
                f"{where}: `{path}` must be an object; got {_kind(data)}.", hint=READS_HINT
            )
        self.data, self.where, self.path = data, where, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _fail(self, key: str, expected: str) -> SchemaError:
        got = _kind(self.data[key]) if key in self.data else "nothing"
        return SchemaError(
            f"{self.where}: `{self._name(key)}` must be {expected}; got {got}.", hint=READS_HINT
        )

    def child(self, key: str) -> _Reader:
        if key not in self.data:
            raise SchemaError(f"{self.where}: `{self._name(key)}` is missing.", hint=READS_HINT)
        return _Reader(self.data[key], self.where, self._name(key))

    def optional_child(self, key: str) -> _Reader | None:
        return None if self.data.get(key) is None else self.child(key)

    def str(self, key: str, default: Any = ...) -> Any:
        return self._get(key, default, lambda v: isinstance(v, str), "a string")

    def int(self, key: str, default: Any = ...) -> Any:
        return self._get(key, default, _is_int, "an integer")

    def number(self, key: str, default: Any = ...) -> Any:
        value = self._get(key, default, _is_number, "a number")
        return None if value is None else float(value)

    def bool(self, key: str, default: Any = ...) -> Any:
        return self._get(key, default, lambda v: isinstance(v, bool), "true or false")

    def dict(self, key: str, default: Any = ...) -> Any:
        return self._get(key, default, lambda v: isinstance(v, dict), "an object")

    def list(self, key: str) -> list[Any]:
        return self._get(key, ..., lambda v: isinstance(v, list), "a list")

    def _get(self, key: str, default: Any, ok, expected: str) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                if key not in self.data:
                    raise SchemaError(
                        f"{self.where}: `{self._name(key)}` is missing.", hint=READS_HINT
                    )
                raise self._fail(key, expected)
            return default
        value = self.data[key]
        if not ok(value):
            raise self._fail(key, expected)
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), f"a {type(value).__name__}")


# ---- the records ---------------------------------------------------------------------------------


def _numbers(values: Any) -> tuple[float | None, ...]:
    return tuple(None if v is None else float(v) for v in values or [])


@dataclass(frozen=True)
class Interval:
    """A confidence interval (``level``, e.g. 0.95) of an estimated metric: of its mean over
    slices (``low``, ``high``) and of each slice's value."""

    low: float | None
    high: float | None
    per_slice_low: tuple[float | None, ...] = ()
    per_slice_high: tuple[float | None, ...] = ()
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "low": self.low,
            "high": self.high,
            "per_slice_low": list(self.per_slice_low),
            "per_slice_high": list(self.per_slice_high),
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> Interval:
        return cls(
            r.number("low", None),
            r.number("high", None),
            _numbers(r.data.get("per_slice_low")),
            _numbers(r.data.get("per_slice_high")),
            r.number("level", 0.95),
        )


@dataclass(frozen=True)
class Summary:
    """One metric of one record over batch×head slices: mean, max, and every slice.

    Under a row-sampled reference (``reference.mode`` "rows") a value is an estimate: ``interval``
    holds its confidence interval, ``lower_bound`` marks a value that can only be below the truth
    (a max over the sampled rows), and a metric the sample cannot measure has no values and a
    ``note`` that says why.  The three are written only when set, so full-reference documents read
    as before.
    """

    mean: float | None
    max: float | None
    per_slice: tuple[float | None, ...] = ()
    interval: Interval | None = None
    lower_bound: bool = False
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mean": self.mean,
            "max": self.max,
            "per_slice": list(self.per_slice),
        }
        if self.interval is not None:
            out["interval"] = self.interval.to_dict()
        if self.lower_bound:
            out["lower_bound"] = True
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_dict(cls, reader: _Reader) -> Summary:
        interval = reader.optional_child("interval")
        return cls(
            reader.number("mean", None),
            reader.number("max", None),
            _numbers(reader.data.get("per_slice")),
            None if interval is None else Interval.from_dict(interval),
            reader.bool("lower_bound", False),
            reader.str("note", None),
        )

    @classmethod
    def unavailable(cls, note: str) -> Summary:
        """A metric this reference cannot measure, and why."""
        return cls(None, None, note=note)

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        """Summarise per-slice values (a non-finite slice makes the mean and max non-finite)."""
        finite = all(math.isfinite(v) for v in values)
        mean = sum(values) / len(values) if finite else math.inf
        return cls(mean, max(values) if finite else math.inf, tuple(values))


def _summaries(reader: _Reader | None) -> dict[str, Summary]:
    if reader is None:
        return {}
    return {name: Summary.from_dict(reader.child(name)) for name in reader.data}


@dataclass(frozen=True)
class Environment:
    """Where a result was measured."""

    torch: str
    device: str
    device_name: str
    dtype: str
    threads: int
    python: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "torch": self.torch,
            "device": self.device,
            "device_name": self.device_name,
            "dtype": self.dtype,
            "threads": self.threads,
            "python": self.python,
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> Environment:
        return cls(
            r.str("torch", "?"),
            r.str("device"),
            r.str("device_name", ""),
            r.str("dtype"),
            r.int("threads", 0),
            r.str("python", "?"),
        )

    def label(self) -> str:
        """``float32 on cpu (AMD EPYC …)``: how a report names the machine and precision."""
        name = f" ({self.device_name})" if self.device_name else ""
        return f"{self.dtype} on {self.device}{name}"


@dataclass(frozen=True)
class Shape:
    b: int
    h: int
    n_q: int
    n_k: int
    d: int
    d_v: int

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("b", "h", "n_q", "n_k", "d", "d_v")}

    @classmethod
    def from_dict(cls, r: _Reader) -> Shape:
        return cls(*(r.int(k) for k in ("b", "h", "n_q", "n_k", "d", "d_v")))

    @property
    def slices(self) -> int:
        return self.b * self.h


@dataclass(frozen=True)
class InputInfo:
    """The input as run: its name, shape, layout, stored dtype, the softmax scale used, causality."""

    source: str
    shape: Shape
    layout: str
    dtype: str
    scale: float
    causal: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shape": self.shape.to_dict(),
            "layout": self.layout,
            "dtype": self.dtype,
            "scale": self.scale,
            "causal": self.causal,
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> InputInfo:
        return cls(
            r.str("source"),
            Shape.from_dict(r.child("shape")),
            r.str("layout", "bhnd"),
            r.str("dtype", "?"),
            r.number("scale"),
            r.bool("causal", False),
        )

    def describe(self) -> str:
        """One line: the source, its shape and the scale (the scale changes which methods win)."""
        s = self.shape
        return (
            f"{self.source}  b={s.b} h={s.h} n_q={s.n_q} n_k={s.n_k} d={s.d} d_v={s.d_v}  "
            f"scale={self.scale:.6g}" + ("  causal" if self.causal else "")
        )


@dataclass(frozen=True)
class Floors:
    """Errors of the two trivial answers: every query gets the mean of V; every output is zero."""

    mean: dict[str, Summary]
    zero: dict[str, Summary]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": {k: v.to_dict() for k, v in self.mean.items()},
            "zero": {k: v.to_dict() for k, v in self.zero.items()},
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> Floors:
        return cls(_summaries(r.child("mean")), _summaries(r.child("zero")))

    def mean_floor(self, metric: str = "rel_spectral") -> float | None:
        summary = self.mean.get(metric)
        return None if summary is None else summary.mean


@dataclass(frozen=True)
class TimeStat:
    """Seconds per call: median and inter-quartile range over ``repeats`` samples (each the mean
    of ``calls_per_sample`` calls), and the call's peak memory with its source: "cuda"
    (``max_memory_allocated``) or "rss" (the sampled RSS increase on the CPU).  ``extrapolated``:
    exact attention timed on ``extrapolated_rows`` query rows and scaled to all of them (too
    costly to time in full; ALGORITHMS.md §10).  ``min_time``: the seconds of timed calls the
    samples had to reach (``--min-time``)."""

    median: float | None
    iqr: float | None
    repeats: int
    peak_memory_bytes: int | None = None
    calls_per_sample: int = 1
    memory_source: str | None = None
    extrapolated: bool = False
    extrapolated_rows: int | None = None
    min_time: float | None = None  # the seconds of timed calls asked for (--min-time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "iqr": self.iqr,
            "repeats": self.repeats,
            "calls_per_sample": self.calls_per_sample,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_source": self.memory_source,
            "extrapolated": self.extrapolated,
            "extrapolated_rows": self.extrapolated_rows,
            "min_time": self.min_time,
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> TimeStat:
        peak = r.int("peak_memory_bytes", None)
        return cls(
            r.number("median", None),
            r.number("iqr", None),
            r.int("repeats", 0),
            peak,
            r.int("calls_per_sample", 1),
            # before 0.4 only CUDA recorded a peak
            r.str("memory_source", None) or (None if peak is None else "cuda"),
            r.bool("extrapolated", False),
            r.int("extrapolated_rows", None),
            r.number("min_time", None),
        )


@dataclass(frozen=True)
class ResultTime:
    """The method's time and exact attention's, from the same run; ``note`` says why one is absent.

    With ``--backward`` also one forward + backward of each (``backward_s``, ``exact_backward_s``:
    the inputs require grad, the call is the method then ``autograd.grad`` of the output) and
    their ratio; ``backward_note`` says why the method's was not timed (its forward figures
    stand).  The four are written only when set, so older documents read as before.
    """

    method_s: TimeStat | None
    exact_s: TimeStat | None
    speedup: float | None
    note: str | None = None
    backward_s: TimeStat | None = None
    exact_backward_s: TimeStat | None = None
    backward_speedup: float | None = None
    backward_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method_s": None if self.method_s is None else self.method_s.to_dict(),
            "exact_s": None if self.exact_s is None else self.exact_s.to_dict(),
            "speedup": self.speedup,
        }
        if self.note is not None:
            out["note"] = self.note
        if self.backward_s is not None:
            out["backward_s"] = self.backward_s.to_dict()
        if self.exact_backward_s is not None:
            out["exact_backward_s"] = self.exact_backward_s.to_dict()
        if self.backward_speedup is not None:
            out["backward_speedup"] = self.backward_speedup
        if self.backward_note is not None:
            out["backward_note"] = self.backward_note
        return out

    @classmethod
    def from_dict(cls, r: _Reader) -> ResultTime:
        method, exact = r.optional_child("method_s"), r.optional_child("exact_s")
        backward = r.optional_child("backward_s")
        exact_backward = r.optional_child("exact_backward_s")
        return cls(
            None if method is None else TimeStat.from_dict(method),
            None if exact is None else TimeStat.from_dict(exact),
            r.number("speedup", None),
            r.str("note", None),
            None if backward is None else TimeStat.from_dict(backward),
            None if exact_backward is None else TimeStat.from_dict(exact_backward),
            r.number("backward_speedup", None),
            r.str("backward_note", None),
        )

    @property
    def method_median(self) -> float | None:
        return None if self.method_s is None else self.method_s.median

    @property
    def exact_median(self) -> float | None:
        return None if self.exact_s is None else self.exact_s.median

    @property
    def backward_median(self) -> float | None:
        return None if self.backward_s is None else self.backward_s.median

    @property
    def exact_backward_median(self) -> float | None:
        return None if self.exact_backward_s is None else self.exact_backward_s.median


@dataclass(frozen=True)
class Result:
    """One method × budget × seed: what ran, how it went, its errors, time and cost."""

    method: str
    budget: int | None
    seed: int | None
    params: dict[str, Any]
    role: str
    estimates: str
    status: str
    reason: str | None
    errors: dict[str, Summary]
    time: ResultTime | None
    flops: float | None
    beats_mean_floor: bool | None
    environment: Environment
    layer: int | None = None  # the model layer of a capture's input; None for a plain input
    # what a query pays: keys (or features) per query, the FLOPs over exact attention's at the
    # same shape (causal-aware), and how the budget was mapped ("paper" or "keys")
    keys_per_query: float | None = None
    flops_fraction: float | None = None
    budget_mode: str = "paper"
    # the record's stable job key (``kdecli.sweeps.grid``): what resume and merge match records by
    key: str | None = None

    @property
    def oracle(self) -> bool:
        return self.role == "oracle"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def setting(self) -> tuple[int | None, str, int | None, str]:
        """The key that groups a setting's seeds: layer, method, budget, resolved parameters."""
        params = json.dumps(self.params, sort_keys=True, default=str)
        return (self.layer, self.method, self.budget, params)

    def error(self, metric: str) -> float | None:
        summary = self.errors.get(metric)
        return None if summary is None else summary.mean

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "seed": self.seed,
            "params": dict(self.params),
            "role": self.role,
            "oracle": self.oracle,
            "estimates": self.estimates,
            "status": self.status,
            "reason": self.reason,
            "errors": {k: v.to_dict() for k, v in self.errors.items()},
            "time": None if self.time is None else self.time.to_dict(),
            "flops": self.flops,
            "keys_per_query": self.keys_per_query,
            "flops_fraction": self.flops_fraction,
            "budget_mode": self.budget_mode,
            "beats_mean_floor": self.beats_mean_floor,
            "environment": self.environment.to_dict(),
            "layer": self.layer,
        } | ({} if self.key is None else {"key": self.key})

    @classmethod
    def from_dict(cls, r: _Reader, default_environment: Environment | None = None) -> Result:
        method = r.str("method")
        status = r.str("status")
        if status not in STATUSES:
            raise SchemaError(
                f"{r.where}: `{r.path}.status` must be one of {', '.join(STATUSES)}; "
                f"got {status!r}.",
                hint=READS_HINT,
            )
        env = r.optional_child("environment")
        if env is None and default_environment is None:
            raise SchemaError(f"{r.where}: `{r.path}.environment` is missing.", hint=READS_HINT)
        time = r.optional_child("time")
        return cls(
            method=method,
            budget=r.int("budget", None),
            seed=r.int("seed", None),
            params=r.dict("params", {}),
            role=r.str("role", None) or _legacy_role(method, r.bool("oracle", False)),
            estimates=r.str("estimates", "softmax"),
            status=status,
            reason=r.str("reason", None),
            errors=_summaries(r.optional_child("errors")),
            time=None if time is None else ResultTime.from_dict(time),
            flops=r.number("flops", None),
            beats_mean_floor=r.bool("beats_mean_floor", None),
            environment=default_environment if env is None else Environment.from_dict(env),
            layer=r.int("layer", None),
            keys_per_query=r.number("keys_per_query", None),
            flops_fraction=r.number("flops_fraction", None),
            budget_mode=r.str("budget_mode", "paper"),
            key=r.str("key", None),
        )


def _legacy_role(method: str, oracle: bool) -> str:
    """Version-1 results carry no role: the registry's declaration, else what the record says."""
    from kdecli.methods import get_method_class, method_names

    if method in method_names():
        return get_method_class(method).role
    return "oracle" if oracle else "approximation"


@dataclass(frozen=True)
class ParetoPick:
    """A method's cheapest setting that reaches the target error."""

    budget: int | None
    params: dict[str, Any]
    flops: float | None
    error: float
    method_s: float | None

    def to_dict(self, metric: str) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "params": dict(self.params),
            "flops": self.flops,
            metric: self.error,
            "method_s": self.method_s,
        }


@dataclass(frozen=True)
class Pareto:
    """``--target-error``: per method (in order of first appearance), its cheapest setting or None."""

    target_error: float
    metric: str
    methods: dict[str, ParetoPick | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_error": self.target_error,
            "metric": self.metric,
            "methods": {
                name: None if pick is None else pick.to_dict(self.metric)
                for name, pick in self.methods.items()
            },
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> Pareto:
        metric = r.str("metric", "rel_spectral")
        methods = {}
        for name, pick in r.dict("methods", {}).items():
            if pick is None:
                methods[name] = None
                continue
            p = _Reader(pick, r.where, f"{r.path}.methods.{name}")
            methods[name] = ParetoPick(
                p.int("budget", None),
                p.dict("params", {}),
                p.number("flops", None),
                p.number(metric),
                p.number("method_s", None),
            )
        return cls(r.number("target_error"), metric, methods)


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a run over a capture's layers: its input as run and its floors."""

    layer: int | None
    input: InputInfo
    floors: Floors

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "input": self.input.to_dict(), "floors": self.floors.to_dict()}

    @classmethod
    def from_dict(cls, r: _Reader) -> LayerInfo:
        return cls(
            r.int("layer", None),
            InputInfo.from_dict(r.child("input")),
            Floors.from_dict(r.child("floors")),
        )


@dataclass(frozen=True)
class ReferenceInfo:
    """The exact reference a run measured against: every query (``mode`` "full"), or ``rows``
    query rows drawn with ``seed`` (``mode`` "rows"; ALGORITHMS.md §10), whose errors are
    estimates with a ``level`` interval from ``draws`` bootstrap resamples of the rows.
    ``requested`` is what ``--reference`` asked for (``auto`` picks by the input's size)."""

    mode: str = "full"
    rows: int | None = None
    seed: int | None = None
    requested: str = "full"
    interval: str | None = None  # how the intervals were computed: "bootstrap"
    draws: int | None = None
    level: float | None = None

    @property
    def sampled(self) -> bool:
        return self.mode == "rows"

    @property
    def primary_metric(self) -> str:
        """The metric that ranks and meets the floor: rel_spectral, which needs every row, or
        rel_frobenius under a row sample."""
        return "rel_frobenius" if self.sampled else "rel_spectral"

    def to_dict(self) -> dict[str, Any]:
        interval = None
        if self.interval is not None:
            interval = {"method": self.interval, "draws": self.draws, "level": self.level}
        return {
            "mode": self.mode,
            "rows": self.rows,
            "seed": self.seed,
            "requested": self.requested,
            "interval": interval,
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> ReferenceInfo:
        mode = r.str("mode", "full")
        if mode not in ("full", "rows"):
            raise SchemaError(
                f"{r.where}: `{r.path}.mode` must be full or rows; got {mode!r}.", hint=READS_HINT
            )
        interval = r.optional_child("interval")
        return cls(
            mode,
            r.int("rows", None),
            r.int("seed", None),
            r.str("requested", mode),
            None if interval is None else interval.str("method", None),
            None if interval is None else interval.int("draws", None),
            None if interval is None else interval.number("level", None),
        )


@dataclass(frozen=True)
class Conflict:
    """Records of one job key whose measurements disagree (``kdecli merge``): the kept one is
    among the results; ``records`` holds the others, so a later merge sees them again."""

    key: str
    job: JobEntry | None
    records: tuple[Result, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "job": None if self.job is None else self.job.to_dict(),
            "records": [record.to_dict() for record in self.records],
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> Conflict:
        job = r.dict("job", None)
        records = [
            Result.from_dict(_Reader(item, r.where, f"{r.path}.records[{i}]"))
            for i, item in enumerate(r.list("records"))
        ]
        return cls(r.str("key"), None if job is None else JobEntry.from_dict(job), tuple(records))


@dataclass(frozen=True)
class MergeInfo:
    """What ``kdecli merge`` found: the grid's records no part holds, and the conflicts."""

    missing: tuple[JobEntry, ...] = ()
    conflicts: tuple[Conflict, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "missing": [job.to_dict() for job in self.missing],
            "conflicts": [conflict.to_dict() for conflict in self.conflicts],
        }

    @classmethod
    def from_dict(cls, r: _Reader) -> MergeInfo:
        conflicts = r.data.get("conflicts") or []
        return cls(
            tuple(JobEntry.from_dict(job) for job in r.data.get("missing") or []),
            tuple(
                Conflict.from_dict(_Reader(item, r.where, f"{r.path}.conflicts[{i}]"))
                for i, item in enumerate(conflicts)
            ),
        )


def _grid(top: _Reader, where: str) -> GridInfo | None:
    data = top.dict("grid", None)
    if data is None:
        return None
    try:
        return GridInfo.from_dict(data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise SchemaError(f"{where}: `grid` is malformed ({exc}).", hint=READS_HINT) from None


@dataclass
class RunReport:
    """A whole document: the run header and its results (appended as the run goes)."""

    environment: Environment
    input: InputInfo
    floors: Floors
    results: list[Result] = field(default_factory=list)
    pareto: Pareto | None = None
    kdecli_version: str = __version__
    interrupted: bool = False  # the run was stopped: ``results`` holds what finished
    # a run over several layers of a capture: each layer's input and floors (``input`` and
    # ``floors`` above are the first layer's)
    layers: list[LayerInfo] = field(default_factory=list)
    # the exact reference: every query, or a sample of rows (documents before 0.4: full)
    reference: ReferenceInfo = ReferenceInfo()
    # the job grid the run belongs to, and which shard of it this was (``kdecli.sweeps.grid``)
    grid: GridInfo | None = None
    # a merged document: what the merge found (``kdecli.sweeps.merge``)
    merge: MergeInfo | None = None

    def floors_of(self, layer: int | None) -> Floors:
        """The floors that a result of ``layer`` is measured against."""
        return next((x.floors for x in self.layers if x.layer == layer), self.floors)

    def header_dict(self) -> dict[str, Any]:
        """Everything but the results and the Pareto picks: the first line of a JSONL stream."""
        return (
            {
                "schema_version": SCHEMA_VERSION,
                "kdecli_version": self.kdecli_version,
                "environment": self.environment.to_dict(),
                "input": self.input.to_dict(),
                "floors": self.floors.to_dict(),
                "reference": self.reference.to_dict(),
            }
            | ({"interrupted": True} if self.interrupted else {})
            | ({} if self.grid is None else {"grid": self.grid.to_dict()})
        )

    def to_dict(self) -> dict[str, Any]:
        doc = self.header_dict()
        if self.layers:
            doc["layers"] = [layer.to_dict() for layer in self.layers]
        doc["results"] = [r.to_dict() for r in self.results]
        if self.pareto is not None:
            doc["pareto"] = self.pareto.to_dict()
        if self.merge is not None:
            doc["merge"] = self.merge.to_dict()
        return clean(doc)

    as_dict = to_dict  # the name of kdecli 0.1

    @classmethod
    def from_dict(cls, doc: Any, where: str = "document") -> RunReport:
        """Check and read a JSON document of any readable schema version."""
        if not isinstance(doc, dict):
            raise SchemaError(
                f"{where}: holds a JSON {type(doc).__name__}; expected a kdecli result document "
                "(an object with input, environment, floors and results).",
                hint=READS_HINT,
            )
        if doc.get("report") == "inspect":
            raise SchemaError(
                f"{where}: is a `kdecli inspect` report, not `kdecli compare` results.",
                hint=READS_HINT,
            )
        missing = [
            key
            for key in ("schema_version", "input", "environment", "floors", "results")
            if key not in doc
        ]
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
        top = _Reader(doc, where, "")
        environment = Environment.from_dict(top.child("environment"))
        results = top.list("results")
        records = [
            Result.from_dict(_Reader(item, where, f"results[{i}]"), environment)
            for i, item in enumerate(results)
        ]
        pareto = top.optional_child("pareto")
        reference = top.optional_child("reference")
        return cls(
            environment=environment,
            input=InputInfo.from_dict(top.child("input")),
            floors=Floors.from_dict(top.child("floors")),
            results=records,
            pareto=None if pareto is None else Pareto.from_dict(pareto),
            kdecli_version=top.str("kdecli_version", "?"),
            interrupted=top.bool("interrupted", False),
            layers=[
                LayerInfo.from_dict(_Reader(item, where, f"layers[{i}]"))
                for i, item in enumerate(doc.get("layers") or [])
            ],
            reference=ReferenceInfo() if reference is None else ReferenceInfo.from_dict(reference),
            grid=_grid(top, where),
            merge=None if doc.get("merge") is None else MergeInfo.from_dict(top.child("merge")),
        )


# ---- files ---------------------------------------------------------------------------------------


def load_document(path: str | os.PathLike) -> RunReport:
    """Read a results file: a JSON document or a JSONL stream (run line, result lines, pareto)."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(
            f"{path}: no such file." if not path.exists() else f"{path}: is not a file."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: is not a text file.", hint=READS_HINT) from None
    except OSError as exc:
        raise SchemaError(f"{path}: cannot be read ({exc.strerror}).") from None
    return parse_document(text, path)


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
        doc["layers"] = list({layer.get("layer"): layer for layer in reversed(layers)}.values())[
            ::-1
        ]  # a resumed run announces a layer again: its first announcement stands
    if pareto is not None:
        doc["pareto"] = pareto
    return doc


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
    return json.dumps(report.to_dict(), indent=2, allow_nan=False)


def jsonl_header(report: RunReport) -> str:
    return json.dumps(clean({"type": "run", **report.header_dict()}), allow_nan=False)


def jsonl_layer(layer: LayerInfo) -> str:
    """Before the results of each layer of a run over a capture: ``{"type": "layer", ...}``."""
    return json.dumps(clean({"type": "layer", **layer.to_dict()}), allow_nan=False)


def jsonl_result(result: Result) -> str:
    return json.dumps(clean({"type": "result", **result.to_dict()}), allow_nan=False)


def jsonl_pareto(pareto: Pareto) -> str:
    return json.dumps(clean({"type": "pareto", **pareto.to_dict()}), allow_nan=False)
