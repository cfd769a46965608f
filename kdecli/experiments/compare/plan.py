"""The plan of a ``compare`` run, made once: inputs × methods × budgets -> the grid's jobs.

Every request is checked before anything runs (unknown names, bad parameters, budgets > n_k are
usage errors, so a long run never dies half way on a typo), each input's ``Setting`` is resolved
once, and each job carries what running it needs: its setting, the method's name, budget,
parameters as given and resolved, its seeds and their record keys, its estimated cost, and the
method object itself, built once here (``GridJob.instance``).  ``compare``, ``compare_layers``
and the Ray executor run the planned jobs as they are; a shard or a resumed run is a filter over
them (``only``: the record keys still wanted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from kdecli.errors import ParameterError, UsageError
from kdecli.measure.config import RunConfig
from kdecli.measure.setting import Setting
from kdecli.methods import get_method_class, make_method
from kdecli.methods.base import AttentionMethod
from kdecli.qkv import QKV
from kdecli.sweeps.grid import Grid, GridJob, record_key, spec_of

# What a job costs beyond its seeds' calls, for balancing shards: its timing calls, counted as the
# default warm-up + repeats so that the deal does not change with --repeats (a shard rerun with
# other timing options takes the same jobs).
TIMING_CALLS = 4


@dataclass(frozen=True)
class Job:
    """One method × budget as asked, checked, with its method object built."""

    method: str
    budget: int | None
    params: dict[str, Any]
    built: AttentionMethod


def plan_jobs(
    methods: Sequence[str],
    budgets: Sequence[int],
    params: dict[str, dict[str, Any]] | None,
    n_k: int,
    budget_mode: str = "paper",
) -> list[Job]:
    """Validate names, parameters and budgets; one job per method × budget (one for budget-free),
    each budget mapped by ``budget_mode`` and its method built (which names a bad parameter)."""
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
            built = make_method(name, budget, budget_mode=budget_mode, **own)
            jobs.append(Job(name, budget, own, built))
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
    """The job grid of ``compare`` over ``inputs`` (one input × phase × method × budget with its
    seeds per job; under ``phase="both"`` each input's prefill jobs, then its decode jobs), each
    record with its stable key (``kdecli.sweeps.grid``).  Checks what ``compare`` checks,
    so a bad request is refused before anything runs."""
    config = config or RunConfig()
    if settings:
        config = replace(config, **settings)
    seed_list = [config.seed + i for i in range(config.seeds)]
    jobs: list[GridJob] = []
    resolved_settings = []
    parts = [(qkv, setting) for qkv in inputs for setting in Setting.phases_of(qkv, config)]
    for qkv, setting in parts:
        resolved_settings.append(setting)
        shape = setting.measured(qkv).shape
        b, h, n_q, n_k, d, d_v = (shape[name] for name in ("b", "h", "n_q", "n_k", "d", "d_v"))
        for job in plan_jobs(list(methods), list(budgets), params, n_k, config.budget_mode):
            method = job.built
            seeds: tuple[int | None, ...] = tuple(seed_list) if method.randomized else (None,)
            resolved = method.resolved_params
            keys = tuple(
                record_key(setting, method.name, method.budget, resolved, seed) for seed in seeds
            )
            calls = len(seeds) + TIMING_CALLS
            cost = method.cost(b, h, n_q, n_k, d, d_v, setting.mask) * calls
            cost += len(seeds) * setting.measuring_cost(shape)
            jobs.append(
                GridJob(
                    qkv.layer,
                    job.method,
                    job.budget,
                    job.params,
                    resolved,
                    seeds,
                    keys,
                    cost,
                    setting,
                    method,
                )  # fmt: skip
            )
    spec = spec_of(resolved_settings, methods, budgets, params or {}, seed_list)
    return Grid(jobs, spec)
