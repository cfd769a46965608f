"""The timed calls of a measurement: a method's forward, its forward + backward, a decode step
(the cache's preparation and the step apart), and exact attention's (in full, or extrapolated from
a row sample past its reach; docs/metrics.md).

Each is timed by ``kdecli.measure.timing.time_call`` (warm-up, synchronisation, autorange) in the
working dtype, on the working device, at the process's thread count, with the options of
``TimingOptions``; a call that fails gives a ``Failure`` (``kdecli.measure.failures``) instead of
a ``Timing``, with the stage named (``timing``, ``backward``, ``timing exact attention``), so one
failed timing never loses a record's errors.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdecli.masks import FULL, Mask
from kdecli.measure.failures import Failure
from kdecli.measure.grads import GradInputs
from kdecli.measure.seeds import generator
from kdecli.measure.timing import Timing, time_call
from kdecli.methods import method_of_role
from kdecli.methods.base import AttentionMethod
from kdecli.qkv import QKV

# Exact attention is timed in full while one call's FLOPs stay under this (about 15 s on 2 CPU
# cores at ~80 GFLOP/s: n = 65536, d = 64, b·h = 1 — 1.1e12 — is still timed in full, so speed-ups
# there are both measured; n = 131072 is not); above it, SDPA runs on EXTRAPOLATION_ROWS query rows
# against every key and the time is scaled (docs/metrics.md).
EXACT_TIMING_LIMIT_FLOPS = {"cpu": 1.5e12, "cuda": 1e14}
EXTRAPOLATION_ROWS = 4096
# One forward + backward of exact attention costs about this many forwards (the backward computes
# the scores again, then dV, dP, dQ and dK: about twice the forward's products); it scales the
# cost compared with EXACT_TIMING_LIMIT_FLOPS when the backward is timed.
FORWARD_BACKWARD_COST = 3.0
# Exact attention gets at least this many warm-up calls: the first SDPA calls of a process set up
# thread buffers.
EXACT_WARMUP = 2
# A decode step's amortised time spreads the cache's one-off preparation over this many steps
# unless told otherwise (``--steps``): a short generation after a long prompt.
DECODE_STEPS = 64

Timed = Timing | Failure


@dataclass(frozen=True)
class TimingOptions:
    """How each timed setting is sampled: at least ``repeats`` samples and ``min_time`` seconds
    of timed calls after ``warmup`` untimed ones (``time_call``); ``clock`` is for tests.
    ``steps``: the decode steps a cache's preparation is amortised over."""

    repeats: int = 3
    warmup: int = 1
    min_time: float = 0.0
    clock: Callable[[], float] = time.perf_counter
    steps: int = DECODE_STEPS

    def time(self, call: Callable[[], object], device: torch.device, warmup: int = 0) -> Timing:
        """``time_call`` of ``call`` with these options (and at least ``warmup`` warm-ups)."""
        return time_call(
            call,
            device,
            repeats=self.repeats,
            warmup=max(self.warmup, warmup),
            min_time=self.min_time,
            clock=self.clock,
        )


def time_method(
    method: AttentionMethod,
    work: QKV,
    scale: float,
    mask: Mask,
    run_seed: int,
    options: TimingOptions,
) -> Timed:
    """The forward of ``method`` as the correctness pass calls it (no gradient, its generator
    seeded as there)."""
    device = work.q.device
    seeded = generator(device, run_seed, method.name)

    def call():
        with torch.no_grad():
            method(work.q, work.k, work.v, scale=scale, mask=mask, generator=seeded)

    try:
        return options.time(call, device)
    except Exception as exc:  # the timing pass is as fault-tolerant as the correctness pass
        return Failure.of(exc, "timing")


@dataclass(frozen=True)
class DecodeTiming:
    """A decode step's times: the step (``decode_step`` on a prepared cache), the cache's one-off
    preparation (None when the method declares none) and the ``steps`` it is amortised over:

        amortised = step + prepare / steps
    """

    step: Timing
    prepare: Timing | None
    steps: int

    @property
    def amortised(self) -> float:
        spread = 0.0 if self.prepare is None else self.prepare.median / self.steps
        return self.step.median + spread


def time_decode_step(
    method: AttentionMethod,
    work: QKV,
    scale: float,
    mask: Mask,
    run_seed: int,
    options: TimingOptions,
    prompt: torch.Tensor | None = None,
) -> DecodeTiming | Failure:
    """A decode step of ``method``: the queries of ``work`` (the last positions under ``mask``,
    ``Causal(n_k − M)``) over its keys and values as the cache.  The preparation
    (``prepare_cache``) is timed on its own when it does work (``DecodeCache.prepared_work``);
    the step is timed on one prepared cache (``decode_step``), so its figure holds only the
    per-step work.  Both are seeded as the correctness pass seeds the forward; the preparation
    is amortised over ``options.steps`` steps.  ``prompt``: the prompt's queries, which a method
    that ``needs_prompt_queries`` prepares its cache with (the others are not given them)."""
    if options.steps < 1:
        raise ValueError("steps must be >= 1")
    device = work.q.device
    seeded = generator(device, run_seed, method.name)

    def prepare():
        with torch.no_grad():
            if method.needs_prompt_queries:
                return method.prepare_cache(
                    work.k, work.v, mask=mask, scale=scale, generator=seeded, queries=prompt
                )
            return method.prepare_cache(work.k, work.v, mask=mask, scale=scale, generator=seeded)

    try:
        cache = prepare()
        prepared = options.time(prepare, device) if cache.prepared_work else None

        def step():
            with torch.no_grad():
                method.decode_step(work.q, cache)

        return DecodeTiming(options.time(step, device), prepared, options.steps)
    except Exception as exc:  # as fault-tolerant as the forward's timing
        return Failure.of(exc, "timing")


def time_backward(
    method: AttentionMethod,
    grads: GradInputs,
    scale: float,
    mask: Mask,
    run_seed: int,
    options: TimingOptions,
) -> Timed:
    """One forward + backward of ``method`` on leaves that require grad, timed as the forward is;
    a method that declares it cannot (``not_supported_reasons`` of those leaves), returns a
    detached output or non-finite gradients, or raises, is a ``Failure`` with the reason."""
    reasons = method.not_supported_reasons(grads.q, grads.k, grads.v, mask)
    if reasons:
        return Failure.unsupported(reasons, "backward")
    device = grads.q.device
    seeded = generator(device, run_seed, method.name)  # seeded as the forward's

    def forward(q, k, v):
        return method(q, k, v, scale=scale, mask=mask, generator=seeded)

    try:
        problem = grads.check(forward)
        if problem:
            return Failure("error", problem)
        return options.time(grads.step(forward), device)
    except Exception as exc:
        return Failure.of(exc, "backward")


def time_exact(
    work: QKV,
    scale: float,
    mask: Mask,
    options: TimingOptions,
    *,
    limit_flops: float | None = None,
    rows: int | None = None,
    grads: GradInputs | None = None,
) -> Timed:
    """Exact attention's time on ``work`` under ``mask``: in full while its cost is at most
    ``limit_flops`` (default ``EXACT_TIMING_LIMIT_FLOPS`` of the device), else extrapolated from
    R = min(rows, n_q) rows (default ``EXTRAPOLATION_ROWS``).  With ``grads``, of one forward +
    backward on its leaves (whose cost counts ``FORWARD_BACKWARD_COST`` forwards).

    The time of exact attention is linear in its query rows, so T(n_q) ≈ T(R) · n_q/R (so is its
    backward's: dQ of R rows, and their share of dK and dV).  Causal: the R rows run unmasked
    against all n_k keys and the time is scaled by the share of (query, key) pairs the mask
    allows too, Σ_i visible_i / (n_q·n_k) — (n_k + 1)/(2 n_k) for ``Causal(0)`` with n_q = n_k —,
    the share of the products a causal kernel computes; R rows of the causal matrix would not
    do, as the last rows cost more than the first.
    """
    exact = method_of_role("reference")()
    device = work.q.device
    b, h, n_q, d = work.q.shape
    n_k, d_v = work.k.shape[-2], work.v.shape[-1]
    if limit_flops is None:
        limit_flops = EXACT_TIMING_LIMIT_FLOPS.get(device.type, EXACT_TIMING_LIMIT_FLOPS["cpu"])
    rows = EXTRAPOLATION_ROWS if rows is None else rows
    cost = exact.cost(b, h, n_q, n_k, d, d_v, mask)
    if grads is not None:
        cost *= FORWARD_BACKWARD_COST
    part = n_q if cost <= limit_flops else min(rows, n_q)
    masked = mask if part == n_q else FULL
    if grads is None:
        q = work.q if part == n_q else work.q[..., :part, :].contiguous()
        call = functools.partial(exact, q, work.k, work.v, scale=scale, mask=masked)
        what = "timing exact attention"
    else:
        call = grads.rows(part).step(lambda q, k, v: exact(q, k, v, scale=scale, mask=masked))
        what = "timing exact attention's backward"
    try:
        timing = options.time(call, device, warmup=EXACT_WARMUP)
    except Exception as exc:
        return Failure.of(exc, what)
    if part == n_q:
        return timing
    return timing.extrapolated(n_q / part * allowed_share(mask, n_q, n_k), part)


def allowed_share(mask: Mask, n_q: int, n_k: int) -> float:
    """The share of the n_q × n_k (query, key) pairs that ``mask`` allows: 1 without a mask."""
    if not mask.is_causal:
        return 1.0
    return int(mask.visible_keys(n_q, n_k).sum()) / (n_q * n_k)
