"""One measured call: a method on the working inputs, its output checked and measured against the
target (``kdecli.measure.target``) -> an ``Outcome``.

The call is as a user makes it (``method(q, k, v, scale=, mask=, generator=)``, no gradient), with
the method's own generator seeded from the run seed (``kdecli.measure.seeds``).  Before it runs,
the method's ``not_supported_reasons`` may refuse the input; while it runs, any exception is
classified (``kdecli.measure.failures``: a refusal, running out of memory, an error); after it, an
output of the wrong shape or with non-finite values is an error.  Only a finite output of the
right shape is measured.  The cost model's FLOPs and the keys a query pays are recorded whatever
happens, with exact attention's FLOPs at the same shape and mask beside them (``Paid``).

Given the float64 inputs (``exact_inputs``), a measured call is also diagnosed in a second pass
(``kdecli.measure.diagnostics``: density, mass recall, selection vs estimation error, row-sum
error), after its errors and apart from them: the errors are the same with or without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdecli.masks import Mask
from kdecli.measure.diagnostics import SharedAttention, diagnose
from kdecli.measure.failures import Failure
from kdecli.measure.figures import Diagnostics, Summary
from kdecli.measure.seeds import generator
from kdecli.measure.target import Target
from kdecli.methods import method_of_role
from kdecli.methods.base import AttentionMethod
from kdecli.qkv import QKV


@dataclass(frozen=True)
class Outcome:
    """What one call of a method × seed gave: ``ok`` and its errors, or a status and why; and,
    where asked, the diagnostics of an ``ok`` call."""

    status: str = "ok"
    reason: str | None = None
    errors: dict[str, Summary] | None = None
    flops: float | None = None
    diagnostics: Diagnostics | None = None

    def error(self, metric: str) -> float | None:
        """The mean over slices of ``metric``, or None."""
        summary = (self.errors or {}).get(metric)
        return None if summary is None else summary.mean


@dataclass(frozen=True)
class Paid:
    """What one call of a method pays on this input: keys per query, and exact attention's FLOPs
    at the same shape and mask, the denominator of ``flops_fraction``."""

    keys_per_query: float | None
    exact_flops: float

    @classmethod
    def of(cls, method: AttentionMethod, work: QKV, mask: Mask) -> Paid:
        b, h, n_q, d = work.q.shape
        n_k, d_v = work.k.shape[-2], work.v.shape[-1]
        keys = method.paid_keys(n_q, n_k, mask)
        exact = method_of_role("reference")().cost(b, h, n_q, n_k, d, d_v, mask)
        return cls(keys if math.isfinite(keys) else None, exact)

    def fraction(self, flops: float | None) -> float | None:
        return None if flops is None or self.exact_flops <= 0 else flops / self.exact_flops


def measure_call(
    method: AttentionMethod,
    work: QKV,
    target: Target,
    scale: float,
    mask: Mask,
    run_seed: int,
    prompt: torch.Tensor | None = None,
    exact_inputs: QKV | None = None,
    shared: SharedAttention | None = None,
) -> Outcome:
    """Run ``method`` once on ``work`` under ``mask`` with its generator for ``run_seed`` and
    measure the output against ``target`` (see the module docstring).  A method that
    ``needs_prompt_queries`` runs as a decode step over a cache prepared with ``prompt`` (the
    queries before ``work``'s), and is refused without it.  ``exact_inputs``: the float64
    inputs the target was computed from, to diagnose the call against (None: no diagnostics);
    ``shared`` their exact attention, kept across the calls on them."""
    if method.needs_prompt_queries:
        reasons = method.not_supported_reasons(work.q, work.k, work.v, mask, prompt_queries=prompt)
    else:
        reasons = method.not_supported_reasons(work.q, work.k, work.v, mask)
    if reasons:
        return Outcome("unsupported", Failure.unsupported(reasons).reason)
    b, h, n_q, d = work.q.shape
    flops = method.cost(b, h, n_q, work.k.shape[-2], d, work.v.shape[-1], mask)
    flops = flops if math.isfinite(flops) else None
    seeded = generator(work.q.device, run_seed, method.name)
    try:
        with torch.no_grad():
            out = _call(method, work, scale, mask, seeded, prompt)
    except Exception as exc:  # one method's bug or allocation must not lose the others' results
        failure = Failure.of(exc)
        return Outcome(failure.status, failure.reason, flops=flops)
    expected = (*work.q.shape[:-1], work.v.shape[-1])
    if tuple(out.shape) != expected:
        return Outcome(
            "error", f"returned shape {tuple(out.shape)}; expected {expected}", flops=flops
        )
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        return Outcome("error", f"non-finite output: {bad} NaN or infinite values", flops=flops)
    errors = target.errors(out)
    diagnostics = None
    if exact_inputs is not None:
        diagnostics = diagnose(
            method, work, exact_inputs, target.exact, out, scale, mask, run_seed, prompt, shared
        )
    return Outcome(errors=errors, flops=flops, diagnostics=diagnostics)


def _call(method, work: QKV, scale: float, mask: Mask, seeded, prompt) -> torch.Tensor:
    """The call as a user makes it: the forward, or for a method that needs the prompt's
    queries the decode step over the cache prepared with them (its only way to run)."""
    if not method.needs_prompt_queries:
        return method(work.q, work.k, work.v, scale=scale, mask=mask, generator=seeded)
    cache = method.prepare_cache(
        work.k, work.v, mask=mask, scale=scale, generator=seeded, queries=prompt
    )
    return method.decode_step(work.q, cache)
