"""The loop of one run: planned jobs (methods × budgets × seeds) against one exact reference ->
records.

1. The plan (``kdecli.experiments.compare.plan``): every request checked before anything runs,
   each input's ``Setting`` resolved once, each method object built once per job.  ``compare``
   plans itself, or runs jobs planned already (``jobs=``: the CLI's grid, a shard's part of it, a
   Ray task's job); ``only`` keeps the records whose keys it holds (a shard, a resumed run).
2. The input prepared once (``kdecli.experiments.compare.prepared``): the float64 reference
   (chunked; under ``reference="rows:R"`` only for R seeded query rows, whose errors are
   estimates: ``kdecli.measure.row_reference``), the floors (``mean`` baseline, zero output, on
   the same rows), and optionally ‖D⁻¹A‖₂ for ``bound_normalized``.
3. Correctness pass: each method × budget × seed with its own generator, errors per slice
   (``kdecli.measure.record``), and unless ``config.diagnoses`` says no, the call's diagnostics
   (``kdecli.measure.diagnostics``).
4. Timing pass: each method × budget once, and exact attention (SDPA) once, in the working dtype,
   on the working device, same thread count; with ``backward`` also one forward + backward of
   each (inputs that require grad, ``autograd.grad`` of the output against a fixed random
   gradient), whose failure leaves the forward's record standing with a note
   (``kdecli.measure.timed``).
A method that cannot run, runs out of memory, raises, or returns non-finite values gets a status
and a reason (``kdecli.measure.failures``); the others still run.

``phase="decode"`` measures the input's last ``queries`` queries over their prefixes (each setting
says which rows: ``Setting.measured``); ``phase="both"`` runs prefill and then decode as two
*parts* of one report, each with its own reference and floors (``report.layers``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kdecli.errors import UsageError
from kdecli.experiments.compare.aggregate import beats_floor
from kdecli.experiments.compare.plan import plan_grid
from kdecli.experiments.compare.prepared import Prepared
from kdecli.experiments.compare.records import LayerInfo, Result, RunReport
from kdecli.measure.config import RunConfig
from kdecli.measure.diagnostics import SharedAttention
from kdecli.measure.failures import Failure
from kdecli.measure.figures import Environment, ResultTime
from kdecli.measure.record import Outcome, Paid, measure_call
from kdecli.measure.seeds import generator
from kdecli.measure.setting import Setting
from kdecli.measure.time_record import decode_time, result_time, with_backward
from kdecli.measure.timed import (
    Timed,
    TimingOptions,
    time_backward,
    time_decode_step,
    time_method,
)
from kdecli.methods.base import AttentionMethod
from kdecli.qkv import QKV
from kdecli.sweeps.grid import GridJob

__all__ = [
    "ProgressFn", "ResultFn", "approx", "compare", "compare_layers", "jobs_of", "parts_of",
]  # fmt: skip

ProgressFn = Callable[[int, int, str], None]
ResultFn = Callable[[Result], None]


def compare(
    qkv: QKV,
    methods: Sequence[str] = ("kdeformer",),
    budgets: Sequence[int] = (256,),
    config: RunConfig | None = None,
    *,
    params: dict[str, dict[str, Any]] | None = None,
    jobs: Sequence[GridJob] | None = None,
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
    parameters.  ``jobs``: jobs ``plan_grid`` planned for ``qkv`` under ``config``, run as planned
    (``methods``, ``budgets`` and ``params`` are then not read).  ``only``: run just the records
    whose keys it holds — a shard, or what a resumed run has left.  ``reuse``: keep this input's
    reference and exact timings for the next call on the same input and settings (one per
    process: what a worker that runs one job per call wants).  ``on_start(report)`` is called once
    the reference and floors exist (before any method runs), ``on_result(result)`` after each
    record, ``on_progress(done, total, label)`` before each.  ``should_stop()`` is asked before
    each record: once it says True the run ends there, and the report (``interrupted``) holds
    the records that finished.
    """
    config = _configured(config, settings)
    if jobs is None:
        jobs = plan_grid([qkv], methods, budgets, config, params=params).jobs
    setting = jobs[0].setting if jobs else Setting.of(qkv, config)
    if len(parts_of(qkv, jobs)) > 1 and len(jobs_of(qkv, jobs)) == len(jobs):  # both phases
        return compare_layers(
            [qkv],
            config=config,
            jobs=jobs,
            only=only,
            reuse=reuse,
            on_start=on_start,
            on_result=on_result,
            on_progress=on_progress,
            should_stop=should_stop,
        )
    if any(job.setting != setting for job in jobs):
        raise UsageError(
            "compare runs the jobs of one input; these were planned for several "
            "(compare_layers runs each input's own)."
        )
    wanted = [(job, job.wanted(only)) for job in jobs]
    wanted = [(job, pairs) for job, pairs in wanted if pairs]
    prepared = Prepared.of(qkv, setting, config, reuse)
    report = replace(prepared.report, results=[])
    primary = report.reference.primary_metric  # rel_frobenius under a row sample
    mean_floor = report.floors.mean_floor(primary)
    if on_start:
        on_start(report)

    def stopping() -> bool:
        report.interrupted = report.interrupted or bool(should_stop and should_stop())
        return report.interrupted

    exact_inputs = None  # the float64 inputs the calls are diagnosed against, when they are
    shared = SharedAttention()  # and their exact attention, computed once for every call
    if wanted and config.diagnoses(setting.rows is not None):
        exact_inputs = setting.measured(qkv).to(setting.device, torch.float64)
    options = TimingOptions(config.repeats, config.warmup, config.min_time, steps=config.steps)
    if wanted and setting.timing and not stopping():
        prepared.time_exact(setting, options, config.seed)
    total = sum(len(pairs) for _, pairs in wanted)
    done = 0
    prompt = None  # decode: the prompt's queries, for the methods that choose from them
    for job, pairs in wanted:
        method = job.instance()
        paid = Paid.of(method, prepared.work, setting.mask)
        if method.needs_prompt_queries and prompt is None:
            prompt = setting.prompt_queries(qkv)
        own_prompt = prompt if method.needs_prompt_queries else None
        timer = _JobTimer(method, prepared, setting, options, own_prompt)
        for seed, key in pairs:
            if stopping():
                break
            run_seed = config.seed if seed is None else seed
            if on_progress:
                on_progress(done, total, f"{job.method} budget={job.budget} seed={run_seed}")
            refused = method.phase_reasons(setting.phase)  # a phase the method does not define
            outcome = (
                Outcome("unsupported", Failure.unsupported(refused).reason)
                if refused
                else measure_call(
                    method,
                    prepared.work,
                    prepared.target,
                    setting.scale,
                    setting.mask,
                    run_seed,
                    own_prompt,
                    exact_inputs,
                    shared,
                )
            )
            counted = paid  # random key sets: the count of this call's own draw
            if outcome.status == "ok":
                counted = _realised(method, prepared.work, setting, run_seed, paid)
            time = None
            if setting.timing and outcome.status == "ok":
                time, failed = timer.time(run_seed)
                if failed is not None:  # the errors stand; the record says why
                    outcome = replace(outcome, status=failed.status, reason=failed.reason)
            beats = None
            if method.role != "baseline":
                beats = beats_floor(outcome.error(primary), mean_floor)
            record = _record(method, run_seed, outcome, time, beats, report.environment, counted)
            record = replace(record, key=key, phase=setting.phase)
            report.results.append(record)
            if on_result:
                on_result(record)
            done += 1
        if report.interrupted:
            break
    if on_progress:
        on_progress(done, total, "interrupted" if report.interrupted else "done")
    return report


def _realised(method: AttentionMethod, work: QKV, setting: Setting, run_seed: int, paid: Paid):
    """``paid`` with the keys per query the method counts on the call's own draw, where it
    counts them (``realised_keys_per_query``); else ``paid`` as modelled."""
    seeded = generator(work.q.device, run_seed, method.name)
    try:
        with torch.no_grad():
            keys = method.realised_keys_per_query(
                work.q, work.k, work.v, setting.scale, seeded, setting.mask
            )
    except Exception:  # the count is a figure beside the errors: never lose them for it
        keys = None
    return paid if keys is None else replace(paid, keys_per_query=keys)


@dataclass
class _JobTimer:
    """The timing pass of one job: the method's forward (and backward) timed once, at the first
    seed that ran ok, and every record of the job given the same figures."""

    method: AttentionMethod
    prepared: Prepared
    setting: Setting
    options: TimingOptions
    prompt: torch.Tensor | None = None  # the prompt's queries, for a method that needs them
    forward: Timed | None = None
    backward: Timed | None = None

    def time(self, run_seed: int) -> tuple[ResultTime, Failure | None]:
        """The record's ``ResultTime``, and the forward's failure if it could not be timed."""
        prepared, setting = self.prepared, self.setting
        decode = getattr(setting, "phase", "prefill") == "decode"  # the cache prepared apart
        if self.forward is None:
            work, scale, mask = prepared.work, setting.scale, setting.mask
            if decode:
                self.forward = time_decode_step(
                    self.method, work, scale, mask, run_seed, self.options, self.prompt
                )
            else:
                self.forward = time_method(self.method, work, scale, mask, run_seed, self.options)
        failed = self.forward if isinstance(self.forward, Failure) else None
        if prepared.grads is not None and self.backward is None and failed is None:
            self.backward = time_backward(
                self.method, prepared.grads, setting.scale, setting.mask, run_seed, self.options
            )
        time = (decode_time if decode else result_time)(self.forward, prepared.exact_time)
        if self.backward is not None:
            time = with_backward(time, self.backward, prepared.exact_backward)
        return time, failed


def compare_layers(
    inputs: Sequence[QKV],
    methods: Sequence[str] = ("kdeformer",),
    budgets: Sequence[int] = (256,),
    config: RunConfig | None = None,
    *,
    params: dict[str, dict[str, Any]] | None = None,
    jobs: Sequence[GridJob] | None = None,
    only: Collection[str] | None = None,
    reuse: bool = False,
    on_start: Callable[[RunReport], None] | None = None,
    on_layer: Callable[[LayerInfo], None] | None = None,
    on_result: ResultFn | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    **settings: Any,
) -> RunReport:
    """``compare`` on each input in turn — the layers of a capture — into one report; under
    ``phase="both"``, on each input's prefill and then its decode (a *part* is one input × phase).

    Each part has its own exact reference, floors and timings; its records carry its ``layer``
    (and ``phase``) and ``report.layers`` its input and floors.  ``on_start`` is called once, when
    the first part is ready; ``on_layer(info)`` when each part is.  A single part without a layer
    is a plain ``compare``.  ``jobs``: the planned jobs to run (``plan_grid`` over ``inputs``; a
    shard's part of them); each input runs its own.  With ``only`` (record keys) or ``jobs``, a
    part none of whose records is wanted is skipped whole: its reference is never computed.
    """
    config = _configured(config, settings)
    only = None if only is None else frozenset(only)
    filtered = only is not None or jobs is not None
    if jobs is None:
        jobs = plan_grid(inputs, methods, budgets, config, params=params).jobs
    planned = [(qkv, own) for qkv in inputs for own in parts_of(qkv, jobs)]
    single = len(planned) == 1 and planned[0][0].layer is None  # a plain compare's document
    if filtered and len(planned) > 1:
        kept = [(qkv, own) for qkv, own in planned if any(job.wanted(only) for job in own)]
        planned = kept or planned[:1]  # nothing wanted: one part's header, no records
    run = {"config": config, "only": only, "reuse": reuse, "should_stop": should_stop}
    if single:
        qkv, own = planned[0]
        return compare(
            qkv, jobs=own, on_start=on_start, on_result=on_result, on_progress=on_progress, **run
        )
    combined: RunReport | None = None
    for qkv, own in planned:

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

        where = [] if qkv.layer is None else [f"layer {qkv.layer}"]
        where += [own[0].setting.phase] if own and len(parts_of(qkv, jobs)) > 1 else []

        def progress(done: int, total: int, label: str, where: str = " ".join(where)) -> None:
            if on_progress:
                on_progress(done, total, f"{where}: {label}" if where else label)

        part = compare(
            qkv, jobs=own, on_start=started, on_result=finished, on_progress=progress, **run
        )
        if part.interrupted:
            combined.interrupted = True
            break
    return combined


def jobs_of(qkv: QKV, jobs: Sequence[GridJob]) -> list[GridJob]:
    """The jobs planned for ``qkv`` (its digest and layer), in the plan's order."""
    return [
        job for job in jobs if job.layer == qkv.layer and job.setting.input_digest == qkv.digest
    ]


def parts_of(qkv: QKV, jobs: Sequence[GridJob]) -> list[list[GridJob]]:
    """The jobs planned for ``qkv``, one list per setting (per phase), in the plan's order; one
    empty list where none is."""
    parts: dict[Setting, list[GridJob]] = {}
    for job in jobs_of(qkv, jobs):
        parts.setdefault(job.setting, []).append(job)
    return list(parts.values()) or [[]]


def approx(
    qkv: QKV, method: str = "kdeformer", budget: int | None = 256, **kwargs: Any
) -> RunReport:
    """One method at one budget: ``compare`` with a single entry."""
    params = kwargs.pop("params", None)
    if params is not None:
        params = {method: params}
    budgets = [budget] if budget is not None else []
    return compare(qkv, [method], budgets, params=params, **kwargs)


def _configured(config: RunConfig | None, settings: dict[str, Any]) -> RunConfig:
    """``config`` (default ``RunConfig()``) with the keyword ``settings`` that override it."""
    config = config or RunConfig()
    return replace(config, **settings) if settings else config


def _record(
    method: AttentionMethod,
    run_seed: int,
    outcome: Outcome,
    time: ResultTime | None,
    beats: bool | None,
    env: Environment,
    paid: Paid,
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
        diagnostics=outcome.diagnostics,
    )
