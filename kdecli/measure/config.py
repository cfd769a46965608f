"""``RunConfig``: how a run measures, as asked (seeds, device and precision, mask, timing).

A ``RunConfig`` that exists is valid: its fields are checked once, when it is made (a bad
``--reference`` or ``--seeds`` is refused before any input is read), and every layer below takes
it as given.  What depends on the input too (the device resolved, the working dtype, the softmax
scale, the mask and the reference plan) is resolved once per input into a ``Setting``
(``kdecli.measure.setting``), the one record of what a measurement is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdecli.errors import UsageError
from kdecli.measure.row_reference import parse_reference
from kdecli.methods.base import BUDGET_MODES

# What a run measures: every query (prefill), the last M queries over their prefixes (decode), or
# the two side by side.  A measurement's own phase is one of the first two (``Setting.phase``).
RUN_PHASES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class RunConfig:
    """How a run measures: seeds, device and precision, the softmax scale and mask, timing.

    ``device`` is ``auto``, ``cpu`` or ``cuda[:i]`` (or a ``torch.device``); ``dtype`` the working
    precision (default: the input's); ``scale`` the softmax temperature (default: the input's, else
    1/√d).  ``causal`` None takes the input's own flag (a decoder capture), else off;
    ``query_offset`` places causal queries: query i sits at key position offset + i (default:
    the last n_q of the n_k positions, ``Causal(n_k − n_q)``; 0 for n_q = n_k).  ``seeds``
    consecutive seeds from ``seed`` run each randomized setting; ``bound`` adds
    ``bound_normalized``; ``timing=False`` skips the timing pass.  Each timed setting gets at
    least ``repeats`` samples and ``min_time`` seconds of timed calls (``kdecli.measure.timing``;
    0: exactly ``repeats`` calls).  ``budget_mode`` maps each budget m onto a method's parameters:
    "paper" (each paper's own reading) or "keys" (every method pays m keys or features per query).
    ``reference`` is ``full`` (exact output of every query), ``rows:R`` (R seeded query rows:
    errors become estimates with 95 % intervals; ``kdecli.measure.row_reference``) or ``auto``
    (full up to ``row_reference.FULL_REFERENCE_LIMIT``, else ``rows:4096``).  ``backward`` also
    times one forward + backward of each method × budget and of exact attention (SDPA) in the
    timing pass (``ResultTime.backward_s``, ``exact_backward_s``, ``backward_speedup``).
    ``phase``: ``prefill`` measures every query (as before 0.8); ``decode`` measures the last
    ``queries`` (M) queries only, each at its own position over its own prefix: Q's last M rows,
    K and V whole, ``Causal(n_k − M)`` (a causal mask even on an input that is not causal);
    ``both`` measures the two, each with its own reference and floors.  ``diagnostics`` also
    diagnoses each measured call in a second pass (``kdecli.measure.diagnostics``: density, mass
    recall, selection vs estimation error, row-sum error); None: on under a full reference, off
    under a row sample (``diagnoses``).
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
    query_offset: int | None = None  # None: bottom-right (Causal(n_k - n_q)) under a causal mask
    phase: str = "prefill"  # one of RUN_PHASES
    queries: int = 1  # decode: the last M queries measured, each over its own prefix
    steps: int = 64  # decode: the steps a cache's one-off preparation is amortised over
    diagnostics: bool | None = None  # None: on under a full reference, off under rows:R

    def __post_init__(self) -> None:
        self.check()

    def diagnoses(self, sampled: bool) -> bool:
        """Whether the calls of a setting are diagnosed: as asked, else unless its reference is
        a row sample (``sampled``), where the diagnostics cost a pass over every row for
        figures estimated on the sample."""
        return (not sampled) if self.diagnostics is None else self.diagnostics

    def check(self) -> None:
        """Refuse what no input could make valid, with the allowed values (a ``UsageError``)."""
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
        offset = self.query_offset
        if offset is not None and (
            isinstance(offset, bool) or not isinstance(offset, int) or offset < 0
        ):
            raise UsageError(
                f"--query-offset must be an integer >= 0 (a query's position among the keys); "
                f"got {offset!r}."
            )
        if self.phase not in RUN_PHASES:
            raise UsageError(f"--phase must be one of {', '.join(RUN_PHASES)}; got {self.phase!r}.")
        queries = self.queries
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise UsageError(
                f"--queries must be an integer >= 1 (the decode steps measured); got {queries!r}."
            )
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UsageError(
                f"--steps must be an integer >= 1 (the decode steps a cache's preparation is "
                f"amortised over); got {steps!r}."
            )
        if self.phase != "prefill" and self.causal is False:
            raise UsageError(
                "--phase decode measures each query over its own prefix, a causal mask; "
                "drop --no-causal."
            )
        if offset is not None and self.causal is False:
            raise UsageError("--query-offset places queries under a causal mask; drop --no-causal.")
