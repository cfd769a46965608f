"""``--executor ray``: each job of a sweep runs as one Ray task, wherever the cluster has room.

A **task** is one job of the grid (``kdecli.sweeps.grid``): one input × method × budget with the seeds
still wanted (``only``), run by ``compare`` in a Ray worker process, which returns its
``RunReport``.  The grid is planned once, by the caller (the CLI passes its planned jobs) or here
before Ray starts (``plan_grid`` refuses a bad request before any task starts); the driver puts
each input once in the object store, submits one task per planned job (the job itself: its
setting, method, parameters, seeds and keys; the worker builds the method object once), and
streams the reports back in completion order into one report with the callbacks of
``compare_layers``, so the CLI picks either function by ``--executor local|ray``.

Every task measures against its own reference and times exact attention in its own worker
process: a worker runs on some machine of the cluster, so each speed-up is a ratio of two timings
taken on the same machine, thread count and device.  ``compare(reuse=True)`` keeps the last
input's reference and exact timing per worker process, so a worker that runs many jobs of one
input computes them once, not once per job.  Errors do not depend on where a task ran: they are
bit-identical to the in-process executor's at the same thread count.  At another thread count the
last bits of some float sums change (LAPACK's SVD under ``rel_spectral``; float32 products of
performer's and scatterbrain's features), as they would in-process.

Threads: each task asks for ``num_cpus=1``, and Ray starts its workers with ``OMP_NUM_THREADS``
set to the task's CPUs, so torch runs each task on one thread (``environment.threads`` of each
record says so) and a machine with C cores runs C tasks at once.  Tasks that run on CUDA also ask
for ``num_gpus=1``: one GPU each, which Ray chooses (``--device cuda:1`` runs on whichever GPU
Ray gives the task).  Under ``--device auto`` the tasks run on CUDA when the cluster has GPUs,
and the record keys name the device kind the tasks run on, not the driver's: keys (``only``)
planned for the other kind are refused with a message rather than matching nothing.

The cluster: ``RAY_ADDRESS`` names one to connect to (``ray://host:10001``, ``host:6379``, or
``auto`` for the one ``ray start --head`` started on this machine); without it, the command
starts a local Ray on this machine's cores, without the dashboard.  A connection this function
made, it ends when the sweep ends — a local Ray started here does not outlive the command, and a
cluster it connected to keeps running (``ray.shutdown`` only disconnects from it); where Ray was
already initialized (a notebook, the tests), it is left as it was.  The workers import kdecli:
each node needs the same version (a worker whose method resolves its parameters otherwise than
the driver's plan fails its task, which is recorded).

Failures: a task that fails as a whole (its worker raised outside a method, crashed, or was killed
for memory: any ``RayError``) becomes one record per wanted key, ``status`` ``error`` (or ``oom``)
with the reason (``kdecli.measure.failures``); the other tasks' records stand.  A method's own
failures are records of the task already (``compare`` catches them).  Each input's header (its
floors) comes from its first task that finishes; when that task failed, the driver computes the
header itself (``compare`` with no job: the reference and floors, no timing) rather than holding
the failure back, so records still arrive in completion order.  ``should_stop()`` is asked every ``WAIT_S`` seconds:
once it says True the tasks still pending are cancelled (``ray.cancel``: a queued task never
starts, a running one is interrupted), the finished ones are kept, and the report is
``interrupted``; stopped before any task finished, it holds the first input without floors, and
``on_start`` is not called (no input is ready).  Asked to stop before the first task is sent,
it sends none.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from kdecli.errors import RuntimeFailure, UsageError, first_line
from kdecli.experiments.compare.plan import plan_grid
from kdecli.experiments.compare.records import LayerInfo, Result, RunReport
from kdecli.experiments.compare.run import (
    ProgressFn,
    ResultFn,
    compare,
    compare_layers,
    jobs_of,
)
from kdecli.measure.config import RunConfig
from kdecli.measure.environment import describe_input, environment
from kdecli.measure.failures import Failure
from kdecli.measure.figures import Floors
from kdecli.measure.setting import Setting
from kdecli.methods import get_method_class
from kdecli.qkv import QKV
from kdecli.sweeps.grid import GridJob

WAIT_S = 0.5  # how often should_stop is asked while tasks run
INSTALL_HINT = "pip install 'kdecli[ray]'"


def run_on_ray(
    inputs: Sequence[QKV],
    methods: Sequence[str] = ("kdeformer",),
    budgets: Sequence[int] = (256,),
    config: RunConfig | None = None,
    *,
    params: dict[str, dict[str, Any]] | None = None,
    jobs: Sequence[GridJob] | None = None,
    only: Collection[str] | None = None,
    on_start: Callable[[RunReport], None] | None = None,
    on_layer: Callable[[LayerInfo], None] | None = None,
    on_result: ResultFn | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    **settings: Any,
) -> RunReport:
    """``compare_layers`` with each job a Ray task: the same arguments, callbacks and report.

    ``jobs``: jobs planned already (``plan_grid`` over ``inputs``, for the device kind the tasks
    run on); else the grid of ``methods`` × ``budgets`` is planned here.  ``on_start(report)``
    once the first input's header is known, ``on_layer(info)`` when a task of an input not seen
    yet finishes (inputs that are layers), ``on_result(record)`` for each record in the order the
    tasks finish, ``on_progress(done, total, label)`` after each task (records done of those
    wanted).  The report's ``results`` and ``layers`` are in the grid's order.  See the module
    docstring for the cluster, failures and interrupts.
    """
    ray = _import_ray()
    config = config or RunConfig()
    if settings:
        config = replace(config, **settings)
    kind = _device_kind(config.device)
    only = None if only is None else frozenset(only)
    local = {
        "only": only, "on_start": on_start, "on_layer": on_layer, "on_result": on_result,
        "on_progress": on_progress, "should_stop": should_stop,
    }  # fmt: skip
    given = jobs is not None
    if jobs is None:  # refused before Ray starts: the plan's checks need no device
        guess = "cpu" if kind == "auto" else kind
        jobs = plan_grid(inputs, methods, budgets, _planned(config, guess), params=params).jobs
    if only is not None and not only:  # nothing to run (a finished --resume): one header
        return compare_layers(inputs, config=_local(config), jobs=[], **local)
    started = _connect(ray)
    try:
        kind = _task_kind(ray, kind)
        config = replace(config, device=kind)
        planned_for = {job.setting.device.type for job in jobs}
        if planned_for - {kind}:
            if given:  # the caller's keys name the other kind: they would match nothing
                _refuse_other_kind(planned_for.pop(), kind)
            jobs = plan_grid(inputs, methods, budgets, _planned(config, kind), params=params).jobs
        wanted = _wanted(inputs, jobs, only)
        if not any(tasks for _, tasks in wanted):
            if only and not given:
                _check_device_of_keys(inputs, methods, budgets, config, params, only, kind)
            return compare_layers(inputs, config=_local(config), jobs=[], **local)
        sweep = _Sweep(ray, inputs, wanted, config, on_start, on_layer, on_result, on_progress)
        return sweep.run(should_stop)
    finally:
        if started:
            ray.shutdown()


# ---- the cluster ---------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--executor ray needs Ray, which is not installed.", hint=INSTALL_HINT
        ) from None
    return ray


def _connect(ray) -> bool:
    """Connect to the cluster ``RAY_ADDRESS`` names, else start a local one; True when this call
    made the connection (and so ends it), False when Ray was initialized already."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init()  # reads RAY_ADDRESS; a cluster's own settings are not ours to pass
        else:
            # Ray's own start-up notes (INFO) would mix with kdecli's on stderr; warnings stay
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    except Exception as exc:  # ConnectionError, a version mismatch, a bad address...
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
        raise RuntimeFailure(
            f"could not start or reach {where}: {type(exc).__name__}: {first_line(exc)}",
            hint="Unset RAY_ADDRESS for a local Ray, or check that the cluster is up "
            "(`ray status`).",
        ) from None
    return True


def _device_kind(device: str | torch.device) -> str:
    """``auto``, ``cpu`` or ``cuda`` (a GPU's index is Ray's to choose)."""
    if isinstance(device, torch.device):
        kind = device.type
    elif device == "auto":
        kind = "auto"
    else:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError):
            kind = None
    if kind not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:i]; got {device!r}.")
    return kind


def _task_kind(ray, kind: str) -> str:
    """Where the tasks run: ``auto`` is CUDA when the cluster has a GPU."""
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    if kind == "cuda" and not gpus:
        raise UsageError(
            "--device cuda was asked for, but the Ray cluster has no GPU.",
            hint="Use --device cpu or --device auto, or a cluster with GPUs (RAY_ADDRESS).",
        )
    if kind == "auto":
        return "cuda" if gpus else "cpu"
    return kind


def _planned(config: RunConfig, kind: str) -> RunConfig:
    """``config`` as the driver plans it: record keys name the device kind the tasks run on,
    which the driver itself need not have."""
    return replace(config, device=torch.device(kind))


def _check_device_of_keys(inputs, methods, budgets, config, params, only, kind) -> None:
    """Keys (``only``) planned for the other device kind match nothing here: say so."""
    other = "cpu" if kind == "cuda" else "cuda"
    theirs = plan_grid(inputs, methods, budgets, _planned(config, other), params=params)
    if not only.isdisjoint(theirs.keys):
        _refuse_other_kind(other, kind)


def _refuse_other_kind(other: str, kind: str) -> None:
    raise UsageError(
        f"the record keys asked for were planned for --device {other}, but the Ray tasks "
        f"run on {kind} (the cluster {'has' if kind == 'cuda' else 'has no'} GPUs).",
        hint=f"Plan the grid, and run, with --device {kind}.",
    )


def _local(config: RunConfig) -> RunConfig:
    """``config`` for what the driver computes itself: CUDA only where the driver has it."""
    if _device_kind(config.device) == "cuda" and not torch.cuda.is_available():
        return replace(config, device="cpu")
    return config


# ---- the sweep -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    """One submitted job: its input (by position), the job, and the seeds and keys it runs."""

    index: int
    job: GridJob
    seeds: tuple[int | None, ...]
    keys: tuple[str, ...]

    def label(self, layered: bool) -> str:
        """``layer 3: kdeformer budget=64``, as ``compare_layers`` labels its progress."""
        job = self.job
        text = job.method if job.budget is None else f"{job.method} budget={job.budget}"
        return f"layer {job.layer}: {text}" if layered else text


def _wanted(
    inputs: Sequence[QKV], jobs: Sequence[GridJob], only: frozenset[str] | None
) -> list[tuple[QKV, list[_Task]]]:
    """Each input with its tasks: its planned jobs with at least one wanted key (``only``;
    None: all)."""
    plans = []
    for index, qkv in enumerate(inputs):
        tasks = []
        for job in jobs_of(qkv, jobs):
            pairs = job.wanted(only)
            if pairs:
                seeds, keys = zip(*pairs)
                tasks.append(_Task(index, job, seeds, keys))
        plans.append((qkv, tasks))
    return plans


def _run_job(qkv: QKV, job: GridJob, config: RunConfig, keys: frozenset[str]) -> RunReport:
    """The task: one planned job's wanted records, measured in this worker process (which
    builds the job's method once: a job travels without it)."""
    return compare(qkv, config=config, jobs=[job], only=keys, reuse=True)


class _Sweep:
    """The tasks of one run on Ray, and the report they make as they finish."""

    def __init__(
        self, ray, inputs, wanted, config, on_start, on_layer, on_result, on_progress
    ):  # fmt: skip
        self.ray = ray
        self.inputs = list(inputs)
        self.config = config
        self.on_start, self.on_layer = on_start, on_layer
        self.on_result, self.on_progress = on_result, on_progress
        self.tasks = [task for _, tasks in wanted for task in tasks]
        # as compare_layers: more than one input, or one that is a layer, makes a layered report
        # (of the inputs with something wanted)
        kept = [qkv for qkv, tasks in wanted if tasks] if len(wanted) > 1 else list(inputs)
        self.layered = not (len(kept) == 1 and kept[0].layer is None)
        self.order = {key: i for i, key in enumerate(k for t in self.tasks for k in t.keys)}
        self.total = len(self.order)
        self.done = 0
        self.report: RunReport | None = None
        self.headers: dict[int, LayerInfo] = {}

    def run(self, should_stop: Callable[[], bool] | None) -> RunReport:
        ray = self.ray
        remote = ray.remote(_run_job).options(
            num_cpus=1, num_gpus=1 if self.config.device == "cuda" else 0
        )
        indices = sorted({task.index for task in self.tasks})
        stored = {i: ray.put(self.inputs[i]) for i in indices}  # each input once
        pending: dict[Any, _Task] = {}
        if should_stop is not None and should_stop():  # asked to stop before anything ran
            return self._finished(True)
        interrupted = False
        try:
            for task in self.tasks:
                ref = remote.remote(stored[task.index], task.job, self.config, frozenset(task.keys))
                pending[ref] = task
            self._progress(f"{len(self.tasks)} tasks on Ray")
            while pending:
                if should_stop is not None and should_stop():
                    interrupted = True
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
                for ref in ready:
                    self._finish(pending.pop(ref), ref)
            if interrupted and pending:  # keep what finished meanwhile, cancel the rest
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for ref in ready:
                    self._finish(pending.pop(ref), ref)
        finally:
            for ref in pending:  # stopped, or an exception (a second Ctrl-C) on the way out
                ray.cancel(ref)
        return self._finished(interrupted)

    def _finish(self, task: _Task, ref) -> None:
        """One finished task: its input's header if it is the first, then its records."""
        try:
            part = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            self._header(task.index, None)
            failure = Failure.of(exc, "ray task", refusals=False)  # a refusal is a record
            records = self._failed(task, failure.status, failure.reason)
        else:
            self._header(task.index, part)
            got = {record.key: record for record in part.results}
            missing = self._failed(
                task, "error", "ray task failed: the worker's plan has no record with this key "
                "(is the same kdecli installed on every node?)",
            )  # fmt: skip
            records = [
                replace(got[key], layer=task.job.layer) if key in got else lost
                for key, lost in zip(task.keys, missing)
            ]
        for record in records:
            self.report.results.append(record)
            if self.on_result:
                self.on_result(record)
        self.done += len(records)
        self._progress(task.label(self.layered))

    def _header(self, index: int, part: RunReport | None) -> None:
        """Input ``index``'s header, once: from its first finished task, else computed here."""
        if index in self.headers:
            return
        if part is None:
            part = self._local_header(self.inputs[index])
        info = LayerInfo(self.inputs[index].layer, part.input, part.floors)
        self.headers[index] = info
        if self.report is None:
            self.report = replace(part, results=[], layers=[info] if self.layered else [])
            if self.on_start:
                self.on_start(self.report)
        elif self.layered:
            self.report.layers.append(info)
        if self.layered and self.on_layer:
            self.on_layer(info)

    def _local_header(self, qkv: QKV) -> RunReport:
        """The header of an input whose first task failed: its reference and floors computed
        here (no record, no timing); if even that fails, the input without floors."""
        try:
            return compare(qkv, config=_local(self.config), jobs=[])
        except Exception:  # the task failed there too, most likely; its records say why
            return self._bare_header(qkv)

    def _bare_header(self, qkv: QKV) -> RunReport:
        """An input's header with no floors: what an interrupt before any task finished keeps."""
        setting = Setting.of(qkv, _local(self.config))
        return RunReport(
            environment=self._environment(setting),
            input=describe_input(qkv, setting.scale, setting.mask),
            floors=Floors({}, {}),
        )

    def _environment(self, setting: Setting):
        """The environment the driver names for records it makes itself: the device kind it
        has of the tasks' (``_local``), the working dtype."""
        return environment(torch.device(_device_kind(_local(self.config).device)), setting.dtype)

    def _failed(self, task: _Task, status: str, reason: str) -> list[Result]:
        """One record per wanted key of a task that returned none."""
        job, cls = task.job, get_method_class(task.job.method)
        env = self._environment(job.setting)
        return [
            Result(
                method=job.method,
                budget=job.budget,
                seed=seed,
                params=job.resolved,
                role=cls.role,
                estimates=cls.estimates,
                status=status,
                reason=reason,
                errors={},
                time=None,
                flops=None,
                beats_mean_floor=None,
                environment=env,
                layer=job.layer,
                budget_mode=job.setting.budget_mode,
                key=key,
                phase=job.setting.phase,
            )
            for seed, key in zip(task.seeds, task.keys)
        ]

    def _progress(self, label: str) -> None:
        if self.on_progress:
            self.on_progress(self.done, self.total, label)

    def _finished(self, interrupted: bool) -> RunReport:
        """The report in the grid's order; stopped before any task finished: the first input's
        header without floors (``on_start`` is not called: no input is ready)."""
        report = self.report
        if report is None:
            first = self.inputs[self.tasks[0].index]
            report = self._bare_header(first)
            if self.layered:
                report.layers = [LayerInfo(first.layer, report.input, report.floors)]
        if self.layered and self.headers:  # in input order; input and floors the first's
            report.layers = [self.headers[index] for index in sorted(self.headers)]
            report.input, report.floors = report.layers[0].input, report.layers[0].floors
        report.results.sort(key=lambda record: self.order.get(record.key, self.total))
        report.interrupted = interrupted
        self._progress("interrupted" if interrupted else "done")
        return report
