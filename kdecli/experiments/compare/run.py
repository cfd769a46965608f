"""The loop of one run: methods × budgets × seeds against one exact reference -> records.

1. Check every request before running anything (unknown names, bad parameters, budgets > n_k are
   usage errors, so a long run never dies half way on a typo).
2. Compute the float64 reference once (chunked; under ``reference="rows:R"`` only for R seeded
   query rows, whose errors are estimates: ``kdecli.measure.row_reference``), the floors (``mean``
   baseline, zero output, on the same rows), and optionally ‖D⁻¹A‖₂ for ``bound_normalized``.
3. Correctness pass: each method × budget × seed with its own generator, errors per slice.
4. Timing pass: each method × budget once, and exact attention (SDPA) once, in the working dtype,
   on the working device, same thread count; with ``backward`` also one forward + backward of
   each (inputs that require grad, ``autograd.grad`` of the output against a fixed random
   gradient), whose failure leaves the forward's record standing with a note.
A method that cannot run, runs out of memory, raises, or returns non-finite values gets a status
and a reason; the others still run.
"""

from __future__ import annotations

import functools
import math
import platform
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kdecli.devices import resolve_device, resolve_dtype
from kdecli.errors import (
    ParameterError,
    RuntimeFailure,
    UsageError,
    first_line,
    is_out_of_memory,
)
from kdecli.experiments.compare.aggregate import beats_floor
from kdecli.experiments.compare.records import (
    Environment,
    Floors,
    InputInfo,
    Interval,
    LayerInfo,
    ReferenceInfo,
    Result,
    ResultTime,
    RunReport,
    Shape,
    Summary,
    TimeStat,
)
from kdecli.measure.metrics import slice_errors, spectral_norm
from kdecli.measure.reference import attention_spectral_norm, exact_attention
from kdecli.measure.row_reference import (
    BOOTSTRAP_DRAWS,
    LEVEL,
    RowEstimate,
    RowSample,
    parse_reference,
    resolve_reference,
    sample_rows,
)
from kdecli.measure.timing import Timing, time_call
from kdecli.methods import get_method_class, make_method, method_of_role
from kdecli.methods.base import BUDGET_MODES, AttentionMethod
from kdecli.qkv import QKV
from kdecli.sweeps.grid import Grid, GridJob, Measurement, record_key, spec_of

# Exact attention is timed in full while one call's FLOPs stay under this (about 15 s on 2 CPU
# cores at ~80 GFLOP/s: n = 65536, d = 64, b·h = 1 — 1.1e12 — is still timed in full, so speed-ups
# there are both measured; n = 131072 is not); above it, SDPA runs on EXTRAPOLATION_ROWS query rows
# against every key and the time is scaled (ALGORITHMS.md §10).
EXACT_TIMING_LIMIT_FLOPS = {"cpu": 1.5e12, "cuda": 1e14}
EXTRAPOLATION_ROWS = 4096
# One forward + backward of exact attention costs about this many forwards (the backward computes
# the scores again, then dV, dP, dQ and dK: about twice the forward's products); it scales the
# cost compared with EXACT_TIMING_LIMIT_FLOPS when the backward is timed.
FORWARD_BACKWARD_COST = 3.0
GRAD_OUT_SEED_NAME = "timing/grad_out"
# What a job costs beyond its seeds' calls, for balancing shards (``plan_grid``): its timing calls,
# counted as the default warm-up + repeats so that the deal does not change with --repeats (a
# shard rerun with other timing options takes the same jobs).
TIMING_CALLS = 4  # the backward's fixed output gradient derives from this

ProgressFn = Callable[[int, int, str], None]
ResultFn = Callable[[Result], None]


@dataclass(frozen=True)
class RunConfig:
    """How a run measures: seeds, device and precision, the softmax scale, timing.

    ``device`` is ``auto``, ``cpu`` or ``cuda[:i]`` (or a ``torch.device``); ``dtype`` the working
    precision (default: the input's); ``scale`` the softmax temperature (default: the input's, else
    1/√d).  ``seeds`` consecutive seeds from ``seed`` run each randomized setting; ``bound`` adds
    ``bound_normalized``; ``timing=False`` skips the timing pass.  Each timed setting gets at
    least ``repeats`` samples and ``min_time`` seconds of timed calls (``kdecli.measure.timing``; 0:
    exactly ``repeats`` calls).  ``budget_mode`` maps each budget m onto a method's parameters:
    "paper" (each paper's own reading) or "keys" (every method pays m keys or features per query).
    ``reference`` is ``full`` (exact output of every query), ``rows:R`` (R seeded query rows:
    errors become estimates with 95 % intervals; ``kdecli.measure.row_reference``) or ``auto`` (full up to
    ``row_reference.FULL_REFERENCE_LIMIT``, else ``rows:4096``).  ``backward`` also times one
    forward + backward of each method × budget and of exact attention (SDPA) in the timing pass
    (``ResultTime.backward_s``, ``exact_backward_s``, ``backward_speedup``).
    """

    seeds: int = 1
    seed: int = 0
    device: str | torch.device = "auto"
    dtype: str | torch.dtype | None = None
    scale: float | None = None
    causal: bool | None = None  # None: the input's own flag (a decoder capture), else False
    repeats: int = 3
    warmup: int = 1
    min_time: float = 0.0  # 0: exactly ``repeats`` calls, as before 0.4; the CLI's default is 0.2
    budget_mode: str = "paper"
    bound: bool = False
    timing: bool = True
    reference: str = "auto"
    backward: bool = False

    def check(self) -> None:
        parse_reference(self.reference)  # a UsageError that names the allowed specs
        if self.seeds < 1:
            raise UsageError(f"--seeds must be at least 1; got {self.seeds}.")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError(
                f"--repeats must be >= 1 and --warmup >= 0; got {self.repeats} and {self.warmup}."
            )
        if not (self.min_time >= 0 and math.isfinite(self.min_time)):
            raise UsageError(f"--min-time must be a number of seconds >= 0; got {self.min_time}.")
        if self.budget_mode not in BUDGET_MODES:
            raise UsageError(
                f"--budget-mode must be one of {', '.join(BUDGET_MODES)}; got {self.budget_mode!r}."
            )


@dataclass(frozen=True)
class Job:
    method: str
    budget: int | None
    params: dict[str, Any]
    budget_mode: str = "paper"


def derive_seed(run_seed: int, method: str) -> int:
    """A method's own seed: adding or removing a method never changes another's draws."""
    return zlib.crc32(f"{method}/{run_seed}".encode())


def plan_jobs(
    methods: Sequence[str],
    budgets: Sequence[int],
    params: dict[str, dict[str, Any]] | None,
    n_k: int,
    budget_mode: str = "paper",
) -> list[Job]:
    """Validate names, parameters and budgets; one job per method × budget (one for budget-free),
    each budget mapped by ``budget_mode``."""
    params = params or {}
    for name in params:
        if name != "*" and name not in methods:
            raise UsageError(f"--param given for `{name}`, which is not among the methods run.")
    shared = params.get("*", {})
    jobs = []
    for name in methods:
        cls = get_method_class(name)
        own = {key: value for key, value in shared.items() if key in {p.name for p in cls.params}}
        own.update(params.get(name, {}))
        method_budgets: list[int | None] = list(budgets) if cls.uses_budget else [None]
        if cls.uses_budget and not budgets:
            raise UsageError(f"`{name}` needs a budget; give --budget or --budgets.")
        for budget in method_budgets:
            make_method(name, budget, budget_mode=budget_mode, **own)  # names a bad parameter
            jobs.append(Job(name, budget, own, budget_mode))
    uses_budget = any(job.budget is not None for job in jobs)
    for budget in budgets if uses_budget else []:  # after names and parameters: those say more
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise UsageError(f"budgets must be positive integers; got {budget!r}.")
        if budget > n_k:
            raise UsageError(
                f"budget {budget} is larger than the number of keys (n_k = {n_k}); a budget counts "
                "keys or features per query, so it must be at most n_k."
            )
    unused = set(shared) - {p.name for job in jobs for p in get_method_class(job.method).params}
    if unused:
        raise ParameterError(
            f"no method run here has a parameter named {', '.join(sorted(unused))}."
        )
    return jobs


def plan_grid(
    inputs: Sequence[QKV],
    methods: Sequence[str] = ("kdeformer",),
    budgets: Sequence[int] = (256,),
    config: RunConfig | None = None,
    *,
    params: dict[str, dict[str, Any]] | None = None,
    **settings: Any,
) -> Grid:
    """The job grid of ``compare`` over ``inputs`` (one input × method × budget with its seeds per
    job), each record with its stable key (``kdecli.sweeps.grid``).  Checks what ``compare`` checks, so
    a bad request is refused before anything runs."""
    config = replace(config or RunConfig(), **settings)
    config.check()
    seed_list = [config.seed + i for i in range(config.seeds)]
    jobs: list[GridJob] = []
    measurements = []
    for qkv in inputs:
        setting = _Setting.of(qkv, config)
        measurements.append(setting.measurement)
        b, h, n_q, d = qkv.q.shape
        n_k, d_v = qkv.k.shape[-2], qkv.v.shape[-1]
        for job in plan_jobs(list(methods), list(budgets), params, n_k, config.budget_mode):
            method = make_method(job.method, job.budget, budget_mode=job.budget_mode, **job.params)
            seeds: tuple[int | None, ...] = tuple(seed_list) if method.randomized else (None,)
            resolved = method.resolved_params
            keys = tuple(
                record_key(setting.measurement, method.name, method.budget, resolved, seed)
                for seed in seeds
            )
            calls = len(seeds) + TIMING_CALLS
            cost = method.cost(b, h, n_q, n_k, d, d_v, setting.causal) * calls
            cost += len(seeds) * setting.measuring_cost(qkv)
            jobs.append(
                GridJob(qkv.layer, job.method, job.budget, job.params, resolved, seeds, keys, cost)
            )
    spec = spec_of(measurements, methods, budgets, params or {}, seed_list)
    return Grid(jobs, spec)


@dataclass(frozen=True)
class _Setting:
    """How one input is measured under a config: device, working dtype, softmax scale, causal
    mask and reference plan, resolved (and checked) once, and the key context they make."""

    device: torch.device
    dtype: torch.dtype
    scale: float
    causal: bool
    rows: int | None  # the reference's sampled query rows; None: every row
    measurement: Measurement

    @classmethod
    def of(cls, qkv: QKV, config: RunConfig) -> _Setting:
        causal = qkv.causal(config.causal)
        if causal and qkv.q.shape[-2] != qkv.k.shape[-2]:
            raise UsageError(
                f"--causal needs as many queries as keys; got n_q = {qkv.q.shape[-2]}, "
                f"n_k = {qkv.k.shape[-2]}."
            )
        device = config.device
        device = device if isinstance(device, torch.device) else resolve_device(device)
        dtype = config.dtype
        dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype) or qkv.q.dtype
        scale = qkv.scale(config.scale)
        if not math.isfinite(scale) or scale <= 0:
            raise UsageError(f"--scale must be a positive number; got {scale}.")
        plan = resolve_reference(config.reference, qkv.shape)
        reference = "full" if plan.rows is None else f"rows:{plan.rows}@{config.seed}"
        measurement = Measurement(
            input_digest=qkv.digest,
            layer=qkv.layer,
            dtype=str(dtype).removeprefix("torch."),
            device=device.type,
            scale=scale,
            causal=causal,
            reference=reference,
            budget_mode=config.budget_mode,
            bound=config.bound,
            timing=config.timing,
            backward=config.backward,
        )
        return cls(device, dtype, scale, causal, plan.rows, measurement)

    def measuring_cost(self, qkv: QKV) -> float:
        """FLOPs of measuring one output against the reference, which every record pays on top
        of its call: per slice, rel_spectral's SVD of the (rows × d_v) error (≈ 4·rows·d_v²)
        and the row norms.  It matters: on GloVe at n = 4096 it is as large as a kdeformer call
        at budget 64."""
        b, h, n_q, _ = qkv.q.shape
        d_v = qkv.v.shape[-1]
        rows = n_q if self.rows is None else min(n_q, self.rows)
        return b * h * rows * (4.0 * d_v * d_v + 10.0 * d_v)


def compare(
    qkv: QKV,
    methods: Sequence[str] = ("kdeformer",),
    budgets: Sequence[int] = (256,),
    config: RunConfig | None = None,
    *,
    params: dict[str, dict[str, Any]] | None = None,
    only: Collection[str] | None = None,
    reuse: bool = False,
    on_start: Callable[[RunReport], None] | None = None,
    on_result: ResultFn | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    **settings: Any,
) -> RunReport:
    """Run every method × budget × seed on ``qkv`` and measure it against exact attention.

    ``config`` says how (``RunConfig``); keyword ``settings`` override its fields, so
    ``compare(qkv, ["kdeformer"], [256], seeds=3, device="cpu")`` reads as it should.
    ``params`` maps a method name (or ``"*"`` for every method that has the parameter) to named
    parameters.  ``only``: run just the records whose keys (``plan_grid``) it holds — a shard,
    or what a resumed run has left.  ``reuse``: keep this input's reference and exact timings
    for the next call on the same input and settings (one per process: what a worker that runs
    one job per call wants).  ``on_start(report)`` is called once the reference and floors exist
    (before any method runs), ``on_result(result)`` after each record, ``on_progress(done,
    total, label)`` before each.  ``should_stop()`` is asked before each record: once it says
    True the run ends there, and the report (``interrupted``) holds the records that finished.
    """
    config = replace(config or RunConfig(), **settings)
    grid = plan_grid([qkv], methods, budgets, config, params=params)
    setting = _Setting.of(qkv, config)
    config = replace(config, causal=setting.causal)  # resolved: the timing pass reads it too
    device = setting.device
    wanted = [
        (job, [seed for seed, key in zip(job.seeds, job.keys) if only is None or key in only])
        for job in grid.jobs
    ]
    wanted = [(job, seeds) for job, seeds in wanted if seeds]
    prepared = _Prepared.of(qkv, setting, config, reuse)
    report = replace(prepared.report, results=[])
    primary = report.reference.primary_metric  # rel_frobenius under a row sample
    mean_floor = report.floors.mean_floor(primary)
    if on_start:
        on_start(report)

    def stopping() -> bool:
        report.interrupted = report.interrupted or bool(should_stop and should_stop())
        return report.interrupted

    if wanted and config.timing and not stopping():
        prepared.time_exact(config)
    total = sum(len(seeds) for _, seeds in wanted)
    done = 0
    work = prepared.work
    for job, job_seeds in wanted:
        method = make_method(job.method, job.budget, budget_mode=config.budget_mode, **job.params)
        paid = _Paid.of(method, work, setting.causal)
        method_time: Timing | _Failed | None = None
        backward_time: Timing | _Failed | None = None
        for seed in job_seeds:
            if stopping():
                break
            run_seed = config.seed if seed is None else seed
            if on_progress:
                on_progress(done, total, f"{job.method} budget={job.budget} seed={run_seed}")
            outcome = _run_one(
                method, work, prepared.reference, setting.scale, setting.causal, run_seed, device
            )
            time = None
            if config.timing and outcome.status == "ok":
                if method_time is None:
                    method_time = _time_method(
                        method, work, setting.scale, config, run_seed, device
                    )
                if prepared.grads is not None and backward_time is None:
                    if not isinstance(method_time, _Failed):  # else the record says why already
                        backward_time = _time_backward(
                            method, prepared.grads, setting.scale, config, run_seed, device
                        )
                time = _result_time(method_time, prepared.exact_time)
                if backward_time is not None:
                    time = _with_backward(time, backward_time, prepared.exact_backward)
                if isinstance(method_time, _Failed):  # the errors stand; the record says why
                    outcome = replace(outcome, status=method_time.status, reason=method_time.reason)
            beats = None
            if method.role != "baseline":
                beats = beats_floor(outcome.error(primary), mean_floor)
            record = _record(method, run_seed, outcome, time, beats, report.environment, paid)
            record = replace(record, key=job.key_of(seed))
            report.results.append(record)
            if on_result:
                on_result(record)
            done += 1
        if report.interrupted:
            break
    if on_progress:
        on_progress(done, total, "interrupted" if report.interrupted else "done")
    return report


@dataclass
class _Prepared:
    """One input made ready to measure against: the working tensors, the exact reference, the
    report's header (environment, input, floors, reference) and, once asked for, exact
    attention's timings.  ``reuse`` keeps the last one per process (``_LAST``)."""

    identity: tuple
    work: QKV
    reference: _Reference
    report: RunReport
    exact_time: Timing | _Failed | None = None
    exact_backward: Timing | _Failed | None = None
    grads: _GradInputs | None = None
    timed: bool = False

    @classmethod
    def of(cls, qkv: QKV, setting: _Setting, config: RunConfig, reuse: bool) -> _Prepared:
        global _LAST
        timing = (config.repeats, config.warmup, config.min_time, config.seed)
        identity = (setting.measurement, str(setting.device), timing)
        if reuse and _LAST is not None and _LAST.identity == identity:
            return _LAST
        _LAST = None  # free the last input's tensors before computing this one's
        prepared = cls._compute(qkv, setting, config, identity)
        if reuse:
            _LAST = prepared
        return prepared

    @classmethod
    def _compute(cls, qkv: QKV, setting: _Setting, config: RunConfig, identity) -> _Prepared:
        device, causal = setting.device, setting.causal
        ref_inputs = qkv.to(device, torch.float64)
        plan = resolve_reference(config.reference, qkv.shape)
        try:
            reference = _Reference.compute(ref_inputs, setting.scale, causal, plan.rows, config)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            shape = qkv.shape
            raise RuntimeFailure(
                f"out of memory computing the float64 exact reference on {device} (b·h = "
                f"{shape['b'] * shape['h']}, n_q = {shape['n_q']}, n_k = {shape['n_k']}): "
                f"{first_line(exc)}",
                hint="Use a smaller --n or --batch, or another --device.",
            ) from None
        work = qkv.to(device, setting.dtype)
        report = RunReport(
            environment=environment(device, setting.dtype),
            input=describe_input(qkv, setting.scale, causal),
            floors=floors(reference, ref_inputs.v, causal),
            reference=reference.info(str(parse_reference(config.reference)), config.seed),
        )
        return cls(identity, work, reference, report)

    def time_exact(self, config: RunConfig) -> None:
        """Exact attention's time (and with ``backward`` its forward + backward), once."""
        if self.timed:
            return
        device, scale = self.reference_device, self.report.input.scale
        self.exact_time = _time_exact(self.work, scale, config, device)
        if config.backward:
            self.grads = _GradInputs.of(self.work, config.seed, device)
            self.exact_backward = _time_exact(self.work, scale, config, device, grads=self.grads)
        self.timed = True

    @property
    def reference_device(self) -> torch.device:
        return self.work.q.device


_LAST: _Prepared | None = None


def compare_layers(
    inputs: Sequence[QKV],
    methods: Sequence[str] = ("kdeformer",),
    budgets: Sequence[int] = (256,),
    config: RunConfig | None = None,
    *,
    on_start: Callable[[RunReport], None] | None = None,
    on_layer: Callable[[LayerInfo], None] | None = None,
    on_result: ResultFn | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    **options: Any,
) -> RunReport:
    """``compare`` on each input in turn — the layers of a capture — into one report.

    Each layer has its own exact reference, floors and timings; its records carry its ``layer``
    and ``report.layers`` its input and floors.  ``on_start`` is called once, when the first layer
    is ready; ``on_layer(info)`` when each layer is.  A single input without a layer is a plain
    ``compare``.  With ``only`` (record keys), a layer none of whose records is wanted is skipped
    whole: its reference is never computed.
    """
    only = options.get("only")
    if only is not None:
        options["only"] = only = frozenset(only)
    if only is not None and len(inputs) > 1:
        settings = {k: v for k, v in options.items() if k not in ("only", "reuse")}
        wanted = [
            qkv
            for qkv in inputs
            if not only.isdisjoint(plan_grid([qkv], methods, budgets, config, **settings).keys)
        ]
        inputs = wanted or inputs[:1]  # nothing wanted: one layer's header, no records
    if len(inputs) == 1 and inputs[0].layer is None:
        return compare(
            inputs[0], methods, budgets, config, on_start=on_start, on_result=on_result,
            on_progress=on_progress, should_stop=should_stop, **options,
        )  # fmt: skip
    combined: RunReport | None = None
    for qkv in inputs:

        def started(part: RunReport, layer: int | None = qkv.layer) -> None:
            nonlocal combined
            info = LayerInfo(layer, part.input, part.floors)
            if combined is None:
                combined = replace(part, results=[], layers=[info])
                if on_start:
                    on_start(combined)
            else:
                combined.layers.append(info)
            if on_layer:
                on_layer(info)

        def finished(record: Result, layer: int | None = qkv.layer) -> None:
            record = replace(record, layer=layer)
            combined.results.append(record)
            if on_result:
                on_result(record)

        def progress(done: int, total: int, label: str, layer: int | None = qkv.layer) -> None:
            if on_progress:
                on_progress(done, total, f"layer {layer}: {label}")

        part = compare(
            qkv, methods, budgets, config, on_start=started, on_result=finished,
            on_progress=progress, should_stop=should_stop, **options,
        )  # fmt: skip
        if part.interrupted:
            combined.interrupted = True
            break
    return combined


def approx(
    qkv: QKV, method: str = "kdeformer", budget: int | None = 256, **kwargs: Any
) -> RunReport:
    """One method at one budget: ``compare`` with a single entry."""
    params = kwargs.pop("params", None)
    if params is not None:
        params = {method: params}
    budgets = [budget] if budget is not None else []
    return compare(qkv, [method], budgets, params=params, **kwargs)


# ---- pieces ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """What the correctness pass learned about one method × seed."""

    status: str = "ok"
    reason: str | None = None
    errors: dict[str, Summary] | None = None
    flops: float | None = None

    def error(self, metric: str) -> float | None:
        summary = (self.errors or {}).get(metric)
        return None if summary is None else summary.mean


def _generator(device: torch.device, run_seed: int, name: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(run_seed, name))


@dataclass(frozen=True)
class _Paid:
    """What one call of a method pays on this input: keys per query, and exact attention's FLOPs
    at the same shape (causal-aware), the denominator of ``flops_fraction``."""

    keys_per_query: float | None
    exact_flops: float

    @classmethod
    def of(cls, method: AttentionMethod, work: QKV, causal: bool) -> _Paid:
        b, h, n_q, d = work.q.shape
        n_k, d_v = work.k.shape[-2], work.v.shape[-1]
        keys = method.paid_keys(n_q, n_k, causal)
        exact = method_of_role("reference")().cost(b, h, n_q, n_k, d, d_v, causal)
        return cls(keys if math.isfinite(keys) else None, exact)

    def fraction(self, flops: float | None) -> float | None:
        return None if flops is None or self.exact_flops <= 0 else flops / self.exact_flops


def _record(
    method: AttentionMethod, run_seed, outcome: _Outcome, time, beats, env, paid: _Paid
) -> Result:
    return Result(
        method=method.name,
        budget=method.budget,
        seed=run_seed if method.randomized else None,
        params=method.resolved_params,
        role=method.role,
        estimates=method.estimates,
        status=outcome.status,
        reason=outcome.reason,
        errors=outcome.errors or {},
        time=time,
        flops=outcome.flops,
        beats_mean_floor=beats,
        environment=env,
        keys_per_query=paid.keys_per_query,
        flops_fraction=paid.fraction(outcome.flops),
        budget_mode=method.budget_mode,
    )


def _run_one(method, work: QKV, reference: _Reference, scale, causal, run_seed, device) -> _Outcome:
    reasons = method.not_supported_reasons(work.q, work.k, work.v, causal)
    if reasons:
        return _Outcome("unsupported", "; ".join(reasons))
    b, h, n_q, d = work.q.shape
    flops = method.cost(b, h, n_q, work.k.shape[-2], d, work.v.shape[-1], causal)
    flops = flops if math.isfinite(flops) else None
    try:
        with torch.no_grad():
            out = method(
                work.q,
                work.k,
                work.v,
                scale=scale,
                causal=causal,
                generator=_generator(device, run_seed, method.name),
            )
    except (ParameterError, UsageError) as exc:
        return _Outcome("unsupported", exc.message, flops=flops)
    except Exception as exc:  # one method's bug or allocation must not lose the others' results
        if is_out_of_memory(exc):
            return _Outcome("oom", first_line(exc), flops=flops)
        return _Outcome("error", f"{type(exc).__name__}: {first_line(exc)}", flops=flops)
    expected = (*work.q.shape[:-1], work.v.shape[-1])
    if tuple(out.shape) != expected:
        return _Outcome(
            "error", f"returned shape {tuple(out.shape)}; expected {expected}", flops=flops
        )
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        return _Outcome("error", f"non-finite output: {bad} NaN or infinite values", flops=flops)
    return _Outcome(errors=reference.errors(out), flops=flops)


def _summaries(errors: dict[str, torch.Tensor]) -> dict[str, Summary]:
    return {name: Summary.of(values.reshape(-1).tolist()) for name, values in errors.items()}


# Why a row sample leaves a metric out (the record's ``note``).
NOT_UNDER_ROWS = {
    "rel_spectral": "not available under a row-sampled reference: ‖Õ − O‖₂ is an operator norm "
    "of the whole error matrix, which no sample of its rows bounds (--reference full measures it)",
    "bound_normalized": "not available under a row-sampled reference: it needs ‖Õ − O‖₂ and "
    "‖D⁻¹A‖₂ of every row (--reference full measures it)",
}
ROWS_SEED_NAME = "reference/rows"  # the row sample's seed derives from the run seed and this


@dataclass(frozen=True)
class _Reference:
    """What every output is measured against: the exact float64 output of every query, or of a
    row sample (``RowSample``), and for ``bound_normalized`` the pair (‖D⁻¹A‖₂, ‖V‖₂)."""

    exact: torch.Tensor | RowSample
    norms: tuple[torch.Tensor, torch.Tensor] | None = None
    bound: bool = False  # bound_normalized was asked for

    @classmethod
    def compute(cls, inputs: QKV, scale, causal, rows: int | None, config: RunConfig) -> _Reference:
        """Every row (``rows`` None), or ``rows`` query rows drawn with a seed from the run's."""
        q, k, v = inputs.q, inputs.k, inputs.v
        if rows is not None:
            seed = derive_seed(config.seed, ROWS_SEED_NAME)
            return cls(sample_rows(q, k, v, scale, rows, seed, causal=causal), bound=config.bound)
        norms = None
        if config.bound:
            norms = (
                attention_spectral_norm(q, k, scale, causal=causal),
                spectral_norm(v),
            )
        return cls(exact_attention(q, k, v, scale, causal=causal), norms, config.bound)

    @property
    def n_q(self) -> int:
        return self.exact.n_q if isinstance(self.exact, RowSample) else self.exact.shape[-2]

    def info(self, requested: str, run_seed: int) -> ReferenceInfo:
        if not isinstance(self.exact, RowSample):
            return ReferenceInfo("full", requested=requested)
        rows = self.exact.count
        return ReferenceInfo("rows", rows, run_seed, requested, "bootstrap", BOOTSTRAP_DRAWS, LEVEL)

    def errors(self, out: torch.Tensor) -> dict[str, Summary]:
        """The errors of a full output (b, h, n_q, d_v), one ``Summary`` per metric."""
        if not isinstance(self.exact, RowSample):
            kwargs = {}
            if self.norms is not None:
                kwargs = {"attention_norm": self.norms[0], "value_norm": self.norms[1]}
            return _summaries(slice_errors(out, self.exact, **kwargs))
        errors = _row_summaries(self.exact.estimate(out))
        if self.bound:
            errors["bound_normalized"] = Summary.unavailable(NOT_UNDER_ROWS["bound_normalized"])
        return errors


def _row_summaries(estimate: RowEstimate) -> dict[str, Summary]:
    """A row sample's estimates as records: rel_frobenius with its interval (of the slice-mean and
    of each slice), max_row_rel as a lower bound, rel_spectral absent with the reason."""
    frobenius = Summary.of(estimate.rel_frobenius.reshape(-1).tolist())
    interval = Interval(
        estimate.mean_low,
        estimate.mean_high,
        tuple(estimate.low.reshape(-1).tolist()),
        tuple(estimate.high.reshape(-1).tolist()),
        LEVEL,
    )
    worst = Summary.of(estimate.max_row_rel.reshape(-1).tolist())
    return {
        "rel_spectral": Summary.unavailable(NOT_UNDER_ROWS["rel_spectral"]),
        "rel_frobenius": replace(frobenius, interval=interval),
        "max_row_rel": replace(worst, lower_bound=True),
    }


@dataclass(frozen=True)
class _Failed:
    """A timing that could not be taken: ``oom`` or ``error``, and why."""

    status: str
    reason: str

    @classmethod
    def of(cls, exc: Exception, what: str) -> _Failed:
        if is_out_of_memory(exc):
            return cls("oom", f"{what} ran out of memory: {first_line(exc)}")
        return cls("error", f"{what} failed: {type(exc).__name__}: {first_line(exc)}")


def _time_method(method, work, scale, config: RunConfig, run_seed, device) -> Timing | _Failed:
    generator = _generator(device, run_seed, method.name)

    def call():
        with torch.no_grad():
            method(work.q, work.k, work.v, scale=scale, causal=config.causal, generator=generator)

    try:
        return time_call(
            call, device, repeats=config.repeats, warmup=config.warmup, min_time=config.min_time
        )
    except Exception as exc:  # the timing pass is as fault-tolerant as the correctness pass
        return _Failed.of(exc, "timing")


@dataclass(frozen=True)
class _GradInputs:
    """What a timed forward + backward differentiates: q, k, v as leaves that require grad
    (copies of the working inputs, made once) and a fixed random gradient of the output."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor

    @classmethod
    def of(cls, work: QKV, run_seed: int, device: torch.device) -> _GradInputs:
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (work.q, work.k, work.v))
        generator = torch.Generator(device=device).manual_seed(
            derive_seed(run_seed, GRAD_OUT_SEED_NAME)
        )
        shape = (*work.q.shape[:-1], work.v.shape[-1])
        grad_out = torch.randn(shape, generator=generator, device=device, dtype=work.q.dtype)
        return cls(q, k, v, grad_out)

    def rows(self, part: int) -> _GradInputs:
        """The first ``part`` query rows (a leaf of their own), every key."""
        if part == self.q.shape[-2]:
            return self
        q = self.q.detach()[..., :part, :].contiguous().requires_grad_(True)
        return _GradInputs(q, self.k, self.v, self.grad_out[..., :part, :].contiguous())

    def step(self, forward: Callable[..., torch.Tensor]) -> Callable[[], object]:
        """One timed call: ``forward(q, k, v)``, then the gradients of its output against
        ``grad_out`` (``autograd.grad`` allocates them afresh, so nothing accumulates)."""
        leaves = (self.q, self.k, self.v)

        def call():
            with torch.enable_grad():
                out = forward(*leaves)
                return torch.autograd.grad(out, leaves, self.grad_out, allow_unused=True)

        return call

    def check(self, forward: Callable[..., torch.Tensor]) -> str | None:
        """One untimed forward + backward: why it cannot be timed (a detached output, no
        gradient, non-finite gradients), or None.  Raises what the method raises."""
        leaves = (self.q, self.k, self.v)
        with torch.enable_grad():
            out = forward(*leaves)
            if not out.requires_grad:
                return "backward: the output does not require grad (the method detaches it)"
            grads = torch.autograd.grad(out, leaves, self.grad_out, allow_unused=True)
        if all(g is None for g in grads):
            return "backward: no gradient reaches q, k or v"
        bad = sum(int((~torch.isfinite(g)).sum()) for g in grads if g is not None)
        if bad:
            return f"backward: non-finite gradients: {bad} NaN or infinite values"
        return None


def _time_backward(
    method, grads: _GradInputs, scale, config: RunConfig, run_seed, device
) -> Timing | _Failed:
    """One forward + backward of ``method`` on leaves that require grad, timed as the forward is;
    a method that declares it cannot (``not_supported_reasons`` of those leaves), returns a
    detached output or non-finite gradients, or raises, is a ``_Failed`` with the reason."""
    causal = bool(config.causal)
    reasons = method.not_supported_reasons(grads.q, grads.k, grads.v, causal)
    if reasons:
        return _Failed("unsupported", "backward not supported: " + "; ".join(reasons))
    generator = _generator(device, run_seed, method.name)  # seeded as the forward's

    def forward(q, k, v):
        return method(q, k, v, scale=scale, causal=config.causal, generator=generator)

    try:
        problem = grads.check(forward)
        if problem:
            return _Failed("error", problem)
        return time_call(
            grads.step(forward),
            device,
            repeats=config.repeats,
            warmup=config.warmup,
            min_time=config.min_time,
        )
    except Exception as exc:
        return _Failed.of(exc, "backward")


def _time_exact(
    work: QKV,
    scale,
    config: RunConfig,
    device,
    *,
    limit_flops: float | None = None,
    rows: int | None = None,
    grads: _GradInputs | None = None,
) -> Timing | _Failed:
    """SDPA's time on ``work``: in full while its cost is at most ``limit_flops`` (default
    ``EXACT_TIMING_LIMIT_FLOPS`` of the device), else extrapolated from R = min(rows, n_q) rows
    (default ``EXTRAPOLATION_ROWS``).  With ``grads``, of one forward + backward on its leaves
    (whose cost counts ``FORWARD_BACKWARD_COST`` forwards).

    The time of exact attention is linear in its query rows, so T(n_q) ≈ T(R) · n_q/R (so is its
    backward's: dQ of R rows, and their share of dK and dV).  Causal: the R rows run non-causally
    against all n_k keys and the time is scaled by the causal fraction (n_k + 1)/(2 n_k) too,
    the share of the products a causal kernel computes; R rows of the causal matrix would not
    do, as the last rows cost more than the first.
    """
    exact = method_of_role("reference")()
    b, h, n_q, d = work.q.shape
    n_k, d_v, causal = work.k.shape[-2], work.v.shape[-1], bool(config.causal)
    if limit_flops is None:
        limit_flops = EXACT_TIMING_LIMIT_FLOPS.get(device.type, EXACT_TIMING_LIMIT_FLOPS["cpu"])
    rows = EXTRAPOLATION_ROWS if rows is None else rows
    cost = exact.cost(b, h, n_q, n_k, d, d_v, causal)
    if grads is not None:
        cost *= FORWARD_BACKWARD_COST
    part = n_q
    if cost > limit_flops:
        part = min(rows, n_q)
    masked = causal and part == n_q
    if grads is None:
        q = work.q if part == n_q else work.q[..., :part, :].contiguous()
        call = functools.partial(exact, q, work.k, work.v, scale=scale, causal=masked)
        what = "timing exact attention"
    else:
        call = grads.rows(part).step(lambda q, k, v: exact(q, k, v, scale=scale, causal=masked))
        what = "timing exact attention's backward"
    try:  # at least two warm-up calls: the first SDPA calls of a process set up thread buffers
        timing = time_call(
            call,
            device,
            repeats=config.repeats,
            warmup=max(config.warmup, 2),
            min_time=config.min_time,
        )
    except Exception as exc:
        return _Failed.of(exc, what)
    if part == n_q:
        return timing
    fraction = (n_k + 1) / (2 * n_k) if causal else 1.0
    return timing.extrapolated(n_q / part * fraction, part)


def time_stat(timing: Timing) -> TimeStat:
    """The record of a ``Timing``: what JSON keeps of it."""
    return TimeStat(
        timing.median,
        timing.iqr,
        timing.repeats,
        timing.peak_memory_bytes,
        calls_per_sample=timing.calls_per_sample,
        memory_source=timing.memory_source,
        min_time=timing.min_time,
        extrapolated=timing.extrapolated_rows is not None,
        extrapolated_rows=timing.extrapolated_rows,
    )


def _result_time(method_time: Timing | _Failed, exact_time: Timing | _Failed | None) -> ResultTime:
    if isinstance(method_time, _Failed):
        return ResultTime(None, None, None, note=method_time.reason)
    if isinstance(exact_time, _Failed):
        return ResultTime(time_stat(method_time), None, None, note=exact_time.reason)
    if exact_time is None:
        return ResultTime(time_stat(method_time), None, None)
    return ResultTime(
        time_stat(method_time), time_stat(exact_time), exact_time.median / method_time.median
    )


def _with_backward(
    time: ResultTime, backward: Timing | _Failed, exact: Timing | _Failed | None
) -> ResultTime:
    """``time`` with the forward + backward figures (or why they are missing) added."""
    notes = []
    backward_s = exact_s = speedup = None
    if isinstance(backward, _Failed):
        notes.append(backward.reason)
    else:
        backward_s = time_stat(backward)
    if isinstance(exact, _Failed):
        notes.append(exact.reason)
    elif exact is not None:
        exact_s = time_stat(exact)
        if backward_s is not None and backward.median > 0:
            speedup = exact.median / backward.median
    return replace(
        time,
        backward_s=backward_s,
        exact_backward_s=exact_s,
        backward_speedup=speedup,
        backward_note="; ".join(notes) or None,
    )


def floors(reference: _Reference, v64: torch.Tensor, causal: bool) -> Floors:
    """Errors of the two trivial answers: the mean of V for every query, and zeros (under a row
    sample, on the same rows as every method)."""
    mean_out = method_of_role("baseline")()(
        v64.new_zeros(*v64.shape[:-2], reference.n_q, 1), v64, v64, causal=causal
    )
    return Floors(
        mean=reference.errors(mean_out), zero=reference.errors(torch.zeros_like(mean_out))
    )


def cpu_name() -> str:
    """The processor's marketing name where the OS tells it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> Environment:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return Environment(
        torch=torch.__version__,
        device=str(device),
        device_name=name,
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        python=platform.python_version(),
    )


def describe_input(qkv: QKV, scale: float, causal: bool) -> InputInfo:
    return InputInfo(
        source=qkv.source,
        shape=Shape(**qkv.shape),
        layout=qkv.layout,
        dtype=str(qkv.q.dtype).removeprefix("torch."),
        scale=scale,
        causal=causal,
    )
