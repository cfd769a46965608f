"""The loop of one run: methods × budgets × seeds against one exact reference -> records.

1. Check every request before running anything (unknown names, bad parameters, budgets > n_k are
   usage errors, so a long run never dies half way on a typo).
2. Compute the float64 reference once (chunked), the floors (``mean`` baseline, zero output), and
   optionally ‖D⁻¹A‖₂ for ``bound_normalized``.
3. Correctness pass: each method × budget × seed with its own generator, errors per slice.
4. Timing pass: each method × budget once, and exact attention (SDPA) once, in the working dtype,
   on the working device, same thread count.
A method that cannot run, runs out of memory, raises, or returns non-finite values gets a status
and a reason; the others still run.
"""

from __future__ import annotations

import math
import platform
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kdecli.aggregate import beats_floor
from kdecli.errors import ParameterError, RuntimeFailure, UsageError, is_out_of_memory
from kdecli.inputs import QKV, resolve_device, resolve_dtype
from kdecli.methods import get_method_class, make_method, method_of_role
from kdecli.methods.base import AttentionMethod
from kdecli.metrics import slice_errors, spectral_norm
from kdecli.reference import attention_spectral_norm, exact_attention
from kdecli.results import (
    Environment,
    Floors,
    InputInfo,
    LayerInfo,
    Result,
    ResultTime,
    RunReport,
    Shape,
    Summary,
    TimeStat,
)
from kdecli.timing import Timing, time_call

ProgressFn = Callable[[int, int, str], None]
ResultFn = Callable[[Result], None]


@dataclass(frozen=True)
class RunConfig:
    """How a run measures: seeds, device and precision, the softmax scale, timing.

    ``device`` is ``auto``, ``cpu`` or ``cuda[:i]`` (or a ``torch.device``); ``dtype`` the working
    precision (default: the input's); ``scale`` the softmax temperature (default: the input's, else
    1/√d).  ``seeds`` consecutive seeds from ``seed`` run each randomized setting; ``bound`` adds
    ``bound_normalized``; ``timing=False`` skips the timing pass.
    """

    seeds: int = 1
    seed: int = 0
    device: str | torch.device = "auto"
    dtype: str | torch.dtype | None = None
    scale: float | None = None
    causal: bool | None = None  # None: the input's own flag (a decoder capture), else False
    repeats: int = 3
    warmup: int = 1
    bound: bool = False
    timing: bool = True

    def check(self) -> None:
        if self.seeds < 1:
            raise UsageError(f"--seeds must be at least 1; got {self.seeds}.")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError(
                f"--repeats must be >= 1 and --warmup >= 0; got {self.repeats} and {self.warmup}."
            )


@dataclass(frozen=True)
class Job:
    method: str
    budget: int | None
    params: dict[str, Any]


def derive_seed(run_seed: int, method: str) -> int:
    """A method's own seed: adding or removing a method never changes another's draws."""
    return zlib.crc32(f"{method}/{run_seed}".encode())


def plan_jobs(
    methods: Sequence[str],
    budgets: Sequence[int],
    params: dict[str, dict[str, Any]] | None,
    n_k: int,
) -> list[Job]:
    """Validate names, parameters and budgets; one job per method × budget (one for budget-free)."""
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
            make_method(name, budget, **own)  # raises ParameterError with the parameter's name
            jobs.append(Job(name, budget, own))
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


def compare(
    qkv: QKV,
    methods: Sequence[str] = ("kdeformer",),
    budgets: Sequence[int] = (256,),
    config: RunConfig | None = None,
    *,
    params: dict[str, dict[str, Any]] | None = None,
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
    parameters.  ``on_start(report)`` is called once the reference and floors exist (before any
    method runs), ``on_result(result)`` after each record, ``on_progress(done, total, label)``
    before each.  ``should_stop()`` is asked before each record: once it says True the run ends
    there, and the report (``interrupted``) holds the records that finished.
    """
    config = replace(config or RunConfig(), **settings)
    config.check()
    causal = qkv.causal(config.causal)
    config = replace(config, causal=causal)  # resolved: the timing pass reads it too
    if causal and qkv.q.shape[-2] != qkv.k.shape[-2]:
        raise UsageError(
            f"--causal needs as many queries as keys; got n_q = {qkv.q.shape[-2]}, "
            f"n_k = {qkv.k.shape[-2]}."
        )
    device = config.device
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = config.dtype
    work_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype) or qkv.q.dtype
    softmax_scale = qkv.scale(config.scale)
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise UsageError(f"--scale must be a positive number; got {softmax_scale}.")
    jobs = plan_jobs(list(methods), list(budgets), params, qkv.k.shape[-2])

    ref_inputs = qkv.to(device, torch.float64)
    try:
        reference = exact_attention(
            ref_inputs.q, ref_inputs.k, ref_inputs.v, softmax_scale, causal=causal
        )
        norms = None
        if config.bound:
            norms = (
                attention_spectral_norm(ref_inputs.q, ref_inputs.k, softmax_scale, causal=causal),
                spectral_norm(ref_inputs.v),
            )
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        shape = qkv.shape
        raise RuntimeFailure(
            f"out of memory computing the float64 exact reference on {device} (b·h = "
            f"{shape['b'] * shape['h']}, n_q = {shape['n_q']}, n_k = {shape['n_k']}): "
            f"{_first_line(exc)}",
            hint="Use a smaller --n or --batch, or another --device.",
        ) from None
    work = qkv.to(device, work_dtype)
    env = environment(device, work_dtype)
    report = RunReport(
        environment=env,
        input=describe_input(qkv, softmax_scale, causal),
        floors=floors(reference, ref_inputs.v, causal, norms),
    )
    mean_floor = report.floors.mean_floor()
    del ref_inputs
    if on_start:
        on_start(report)

    def stopping() -> bool:
        report.interrupted = report.interrupted or bool(should_stop and should_stop())
        return report.interrupted

    exact_time = None
    if config.timing and not stopping():
        exact_time = _time_exact(work, softmax_scale, config, device)
    seed_list = [config.seed + i for i in range(config.seeds)]
    total = sum(len(seed_list) if get_method_class(j.method).randomized else 1 for j in jobs)
    done = 0
    for job in jobs:
        method = make_method(job.method, job.budget, **job.params)
        job_seeds = seed_list if method.randomized else seed_list[:1]
        method_time: Timing | _Failed | None = None
        for run_seed in job_seeds:
            if stopping():
                break
            if on_progress:
                on_progress(done, total, f"{job.method} budget={job.budget} seed={run_seed}")
            outcome = _run_one(
                method, work, reference, softmax_scale, causal, run_seed, device, norms
            )
            time = None
            if config.timing and outcome.status == "ok":
                if method_time is None:
                    method_time = _time_method(
                        method, work, softmax_scale, config, run_seed, device
                    )
                time = _result_time(method_time, exact_time)
                if isinstance(method_time, _Failed):  # the errors stand; the record says why
                    outcome = replace(outcome, status=method_time.status, reason=method_time.reason)
            beats = None
            if method.role != "baseline":
                beats = beats_floor(outcome.error("rel_spectral"), mean_floor)
            record = _record(method, run_seed, outcome, time, beats, env)
            report.results.append(record)
            if on_result:
                on_result(record)
            done += 1
        if report.interrupted:
            break
    if on_progress:
        on_progress(done, total, "interrupted" if report.interrupted else "done")
    return report


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
    ``compare``.
    """
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


def _record(method: AttentionMethod, run_seed, outcome: _Outcome, time, beats, env) -> Result:
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
    )


def _run_one(method, work: QKV, reference, scale, causal, run_seed, device, norms) -> _Outcome:
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
            return _Outcome("oom", _first_line(exc), flops=flops)
        return _Outcome("error", f"{type(exc).__name__}: {_first_line(exc)}", flops=flops)
    expected = (*reference.shape[:-1], reference.shape[-1])
    if tuple(out.shape) != expected:
        return _Outcome(
            "error", f"returned shape {tuple(out.shape)}; expected {expected}", flops=flops
        )
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        return _Outcome("error", f"non-finite output: {bad} NaN or infinite values", flops=flops)
    return _Outcome(
        errors=_summaries(slice_errors(out, reference, **_norm_kwargs(norms))), flops=flops
    )


def _norm_kwargs(norms) -> dict[str, torch.Tensor]:
    return {"attention_norm": norms[0], "value_norm": norms[1]} if norms else {}


def _summaries(errors: dict[str, torch.Tensor]) -> dict[str, Summary]:
    return {name: Summary.of(values.reshape(-1).tolist()) for name, values in errors.items()}


@dataclass(frozen=True)
class _Failed:
    """A timing that could not be taken: ``oom`` or ``error``, and why."""

    status: str
    reason: str

    @classmethod
    def of(cls, exc: Exception, what: str) -> _Failed:
        if is_out_of_memory(exc):
            return cls("oom", f"{what} ran out of memory: {_first_line(exc)}")
        return cls("error", f"{what} failed: {type(exc).__name__}: {_first_line(exc)}")


def _time_method(method, work, scale, config: RunConfig, run_seed, device) -> Timing | _Failed:
    generator = _generator(device, run_seed, method.name)

    def call():
        with torch.no_grad():
            method(work.q, work.k, work.v, scale=scale, causal=config.causal, generator=generator)

    try:
        return time_call(call, device, repeats=config.repeats, warmup=config.warmup)
    except Exception as exc:  # the timing pass is as fault-tolerant as the correctness pass
        return _Failed.of(exc, "timing")


def _time_exact(work: QKV, scale, config: RunConfig, device) -> Timing | _Failed:
    exact = method_of_role("reference")()
    try:  # at least two warm-up calls: the first SDPA calls of a process set up thread buffers
        return time_call(
            lambda: exact(work.q, work.k, work.v, scale=scale, causal=config.causal),
            device,
            repeats=config.repeats,
            warmup=max(config.warmup, 2),
        )
    except Exception as exc:
        return _Failed.of(exc, "timing exact attention")


def _time_stat(timing: Timing) -> TimeStat:
    return TimeStat(timing.median, timing.iqr, timing.repeats, timing.peak_memory_bytes)


def _result_time(method_time: Timing | _Failed, exact_time: Timing | _Failed | None) -> ResultTime:
    if isinstance(method_time, _Failed):
        return ResultTime(None, None, None, note=method_time.reason)
    if isinstance(exact_time, _Failed):
        return ResultTime(_time_stat(method_time), None, None, note=exact_time.reason)
    if exact_time is None:
        return ResultTime(_time_stat(method_time), None, None)
    return ResultTime(
        _time_stat(method_time), _time_stat(exact_time), exact_time.median / method_time.median
    )


def floors(reference: torch.Tensor, v64: torch.Tensor, causal: bool, norms) -> Floors:
    """Errors of the two trivial answers: the mean of V for every query, and zeros."""
    mean_out = method_of_role("baseline")()(
        v64.new_zeros(*reference.shape[:-1], 1), v64, v64, causal=causal
    )
    kwargs = _norm_kwargs(norms)
    return Floors(
        mean=_summaries(slice_errors(mean_out, reference, **kwargs)),
        zero=_summaries(slice_errors(torch.zeros_like(reference), reference, **kwargs)),
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
