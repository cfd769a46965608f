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
from dataclasses import dataclass, field
from typing import Any

import torch

from kdecli import __version__
from kdecli.errors import ParameterError, UsageError
from kdecli.inputs import QKV, resolve_device, resolve_dtype
from kdecli.methods import get_method_class, make_method
from kdecli.methods.base import AttentionMethod
from kdecli.metrics import slice_errors, spectral_norm, summarize
from kdecli.reference import attention_spectral_norm, exact_attention
from kdecli.timing import Timing, time_call

SCHEMA_VERSION = 1
ProgressFn = Callable[[int, int, str], None]
ResultFn = Callable[[dict[str, Any]], None]


@dataclass
class RunReport:
    """Everything one run produced; ``as_dict`` is the JSON document of DESIGN.md section 5."""

    environment: dict[str, Any]
    input: dict[str, Any]
    floors: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    pareto: dict[str, Any] | None = None  # kdecli.pareto.cheapest_settings, when asked for

    def as_dict(self) -> dict[str, Any]:
        doc = {
            "schema_version": SCHEMA_VERSION, "kdecli_version": __version__,
            "environment": self.environment, "input": self.input, "floors": self.floors,
            "results": self.results,
        }
        if self.pareto is not None:
            doc["pareto"] = self.pareto
        return doc


@dataclass(frozen=True)
class Job:
    method: str
    budget: int | None
    params: dict[str, Any]


def derive_seed(run_seed: int, method: str) -> int:
    """A method's own seed: adding or removing a method never changes another's draws."""
    return zlib.crc32(f"{method}/{run_seed}".encode())


def plan_jobs(
    methods: Sequence[str], budgets: Sequence[int], params: dict[str, dict[str, Any]] | None,
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
        raise ParameterError(f"no method run here has a parameter named {', '.join(sorted(unused))}.")
    return jobs


def compare(
    qkv: QKV, methods: Sequence[str] = ("kdeformer",), budgets: Sequence[int] = (256,), *,
    seeds: int = 1, seed: int = 0, params: dict[str, dict[str, Any]] | None = None,
    device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
    scale: float | None = None, causal: bool = False, repeats: int = 3, warmup: int = 1,
    bound: bool = False, timing: bool = True, on_start: Callable[[RunReport], None] | None = None,
    on_result: ResultFn | None = None, on_progress: ProgressFn | None = None,
) -> RunReport:
    """Run every method × budget × seed on ``qkv`` and measure it against exact attention.

    ``on_start(report)`` is called once the reference and floors exist (before any method runs),
    ``on_result(record)`` after each record, ``on_progress(done, total, label)`` before each.
    """
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1; got {seeds}.")
    if repeats < 1 or warmup < 0:
        raise UsageError(f"--repeats must be >= 1 and --warmup >= 0; got {repeats} and {warmup}.")
    if causal and qkv.q.shape[-2] != qkv.k.shape[-2]:
        raise UsageError(
            f"--causal needs as many queries as keys; got n_q = {qkv.q.shape[-2]}, n_k = {qkv.k.shape[-2]}."
        )
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    work_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype) or qkv.q.dtype
    softmax_scale = qkv.scale(scale)
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise UsageError(f"--scale must be a positive number; got {softmax_scale}.")
    jobs = plan_jobs(list(methods), list(budgets), params, qkv.k.shape[-2])

    ref_inputs = qkv.to(device, torch.float64)
    reference = exact_attention(ref_inputs.q, ref_inputs.k, ref_inputs.v, softmax_scale, causal=causal)
    norms = None
    if bound:
        norms = (
            attention_spectral_norm(ref_inputs.q, ref_inputs.k, softmax_scale, causal=causal),
            spectral_norm(ref_inputs.v),
        )
    work = qkv.to(device, work_dtype)
    report = RunReport(
        environment=environment(device, work_dtype),
        input=describe_input(qkv, softmax_scale, causal),
        floors=floors(reference, ref_inputs.v, causal, norms),
    )
    del ref_inputs
    if on_start:
        on_start(report)

    exact_time = None
    if timing:
        exact_time = _time_exact(work, softmax_scale, causal, device, repeats, warmup)
    seed_list = [seed + i for i in range(seeds)]
    total = sum(len(seed_list) if get_method_class(j.method).randomized else 1 for j in jobs)
    done = 0
    for job in jobs:
        method = make_method(job.method, job.budget, **job.params)
        job_seeds = seed_list if method.randomized else seed_list[:1]
        method_time: Timing | None | str = None
        for run_seed in job_seeds:
            if on_progress:
                on_progress(done, total, f"{job.method} budget={job.budget} seed={run_seed}")
            record = _run_one(method, work, reference, softmax_scale, causal, run_seed, device, norms)
            if timing and record["status"] == "ok":
                if method_time is None:
                    method_time = _time_method(
                        method, work, softmax_scale, causal, run_seed, device, repeats, warmup
                    )
                _attach_time(record, method_time, exact_time)
            record["beats_mean_floor"] = _beats_floor(record, report.floors)
            report.results.append(record)
            if on_result:
                on_result(record)
            done += 1
    if on_progress:
        on_progress(done, total, "done")
    return report


def approx(qkv: QKV, method: str = "kdeformer", budget: int | None = 256, **kwargs: Any) -> RunReport:
    """One method at one budget: ``compare`` with a single entry."""
    params = kwargs.pop("params", None)
    if params is not None:
        params = {method: params}
    budgets = [budget] if budget is not None else []
    return compare(qkv, [method], budgets, params=params, **kwargs)


# ---- pieces ------------------------------------------------------------------------------------

def _generator(device: torch.device, run_seed: int, name: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(run_seed, name))


def _base_record(method: AttentionMethod, run_seed: int | None) -> dict[str, Any]:
    return {
        "method": method.name, "budget": method.budget,
        "seed": run_seed if method.randomized else None,
        "params": method.resolved_params, "oracle": method.oracle,
        "estimates": getattr(method, "estimates", "softmax"),
        "status": "ok", "reason": None, "errors": {}, "time": None, "flops": None,
    }


def _run_one(method, work: QKV, reference, scale, causal, run_seed, device, norms) -> dict[str, Any]:
    record = _base_record(method, run_seed)
    reasons = method.not_supported_reasons(work.q, work.k, work.v, causal)
    if reasons:
        record.update(status="unsupported", reason="; ".join(reasons))
        return record
    b, h, n_q, d = work.q.shape
    flops = method.flops(b, h, n_q, work.k.shape[-2], d, work.v.shape[-1])
    record["flops"] = flops if math.isfinite(flops) else None
    try:
        with torch.no_grad():
            out = method(work.q, work.k, work.v, scale=scale, causal=causal,
                         generator=_generator(device, run_seed, method.name))
    except torch.OutOfMemoryError as exc:
        record.update(status="oom", reason=_first_line(exc))
        return record
    except (ParameterError, UsageError) as exc:
        record.update(status="unsupported", reason=exc.message)
        return record
    except Exception as exc:  # one method's bug must not lose the others' results
        record.update(status="error", reason=f"{type(exc).__name__}: {_first_line(exc)}")
        return record
    expected = (*reference.shape[:-1], reference.shape[-1])
    if tuple(out.shape) != expected:
        record.update(status="error", reason=f"returned shape {tuple(out.shape)}; expected {expected}")
        return record
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        record.update(status="error", reason=f"non-finite output: {bad} NaN or infinite values")
        return record
    kwargs = {"attention_norm": norms[0], "value_norm": norms[1]} if norms else {}
    errors = slice_errors(out, reference, **kwargs)
    record["errors"] = {name: summarize(values) for name, values in errors.items()}
    return record


def _time_method(method, work, scale, causal, run_seed, device, repeats, warmup) -> Timing | str:
    generator = _generator(device, run_seed, method.name)

    def call():
        with torch.no_grad():
            method(work.q, work.k, work.v, scale=scale, causal=causal, generator=generator)

    try:
        return time_call(call, device, repeats=repeats, warmup=warmup)
    except torch.OutOfMemoryError as exc:
        return f"timing ran out of memory: {_first_line(exc)}"


def _time_exact(work: QKV, scale, causal, device, repeats, warmup) -> Timing | str:
    exact = make_method("exact")
    try:  # at least two warm-up calls: the first SDPA calls of a process set up thread buffers
        return time_call(
            lambda: exact(work.q, work.k, work.v, scale=scale, causal=causal), device,
            repeats=repeats, warmup=max(warmup, 2),
        )
    except torch.OutOfMemoryError as exc:
        return f"exact attention ran out of memory: {_first_line(exc)}"


def _attach_time(record, method_time, exact_time) -> None:
    if isinstance(method_time, str):
        record["time"] = {"method_s": None, "exact_s": None, "speedup": None, "note": method_time}
        return
    exact = exact_time.as_dict() if isinstance(exact_time, Timing) else None
    speedup = exact_time.median / method_time.median if isinstance(exact_time, Timing) else None
    record["time"] = {"method_s": method_time.as_dict(), "exact_s": exact, "speedup": speedup}


def _beats_floor(record, floors) -> bool | None:
    if record["status"] != "ok" or record["method"] == "mean":
        return None
    return record["errors"]["rel_spectral"]["mean"] < floors["mean"]["rel_spectral"]["mean"]


def floors(reference: torch.Tensor, v64: torch.Tensor, causal: bool, norms) -> dict[str, Any]:
    """Errors of the two trivial answers: the mean of V for every query, and zeros."""
    mean_out = make_method("mean")(v64.new_zeros(*reference.shape[:-1], 1), v64, v64, causal=causal)
    kwargs = {"attention_norm": norms[0], "value_norm": norms[1]} if norms else {}
    mean_errors = slice_errors(mean_out, reference, **kwargs)
    zero_errors = slice_errors(torch.zeros_like(reference), reference, **kwargs)
    return {
        "mean": {k: summarize(v) for k, v in mean_errors.items()},
        "zero": {k: summarize(v) for k, v in zero_errors.items()},
    }


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


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "torch": torch.__version__, "device": str(device), "device_name": name,
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def describe_input(qkv: QKV, scale: float, causal: bool) -> dict[str, Any]:
    return {
        "source": qkv.source, "shape": qkv.shape, "layout": qkv.layout,
        "dtype": str(qkv.q.dtype).removeprefix("torch."), "scale": scale, "causal": causal,
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
