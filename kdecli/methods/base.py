"""The one contract every attention approximation follows, and the dispatch on the mask.

A method is a small class with a registered name.  It is built once from a ``budget`` (roughly the
number of keys or features each query pays for) and optional named parameters, then called like
``scaled_dot_product_attention``::

    method = KDEformer(budget=256)                       # or make_method("kdeformer", 256)
    out = method(q, k, v, scale=0.125, generator=g)      # (b, h, n_q, d_v)
    out = method(q, k, v, scale=0.125, generator=g, mask=Causal(offset))

Inputs are ``(batch, heads, n, d)``; ``k`` and ``v`` share ``n_k``; ``q`` may have its own ``n_q``
and ``v`` its own width ``d_v``.  All randomness comes from ``generator``.  Methods are pure: they do
not modify their inputs and keep no state between calls.  ``not_supported_reasons`` says, without
running, why a method cannot run on given inputs; "supported" means the list is empty.

Where the queries sit is a ``kdecli.masks`` value (docs/methods.md): ``FULL``, or
``Causal(offset)``, under which query i sits at key position offset + i and sees keys j ≤ offset + i.
The base class owns the dispatch (``forward``); a subclass writes no branch on the mask:

  1. keys after offset + n_q − 1 are seen by no query: they are dropped (n_k -> offset + n_q);
  2. a causal mask under which every query still sees every key (one query at the last position,
     a decode step) runs as ``FULL``, so its numbers are those of a plain call;
  3. ``FULL`` -> ``forward_full`` (the method's non-causal estimate);
  4. causal, by the declared ``causal_mode``: "native" -> ``forward_causal`` (the method's own
     causal algorithm, given the mask and so its offset); "decomposition" -> the shared recursion
     of ``kdecli.methods.causal`` over the method's ``partial`` (docs/methods.md, with the offset:
     keys [0, offset) are one full block, the causal square after it recurses); "none" -> refused
     by ``not_supported_reasons`` (and a ``UsageError`` if called anyway).

The cost models (``cost``, ``paid_keys``, ``call_memory``) follow the same dispatch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from kdecli.errors import ParameterError, UsageError
from kdecli.masks import FULL, Causal, Full, Mask
from kdecli.methods.causal import (
    decomposed_causal,
    decomposed_flops,
    decomposed_keys_per_query,
    decomposition_memory,
)
from kdecli.methods.common import needs_grad, working_dtype
from kdecli.methods.decode import DecodeCache, decode_mask
from kdecli.methods.keysets import KeySets
from kdecli.methods.params import Param

__all__ = ["AttentionMethod", "BUDGET_MODES", "CAUSAL_MODES", "ROLES", "Param"]

ROLES = ("reference", "baseline", "approximation", "oracle")
BUDGET_MODES = ("paper", "keys")  # how a budget m maps onto parameters (``budget_mapping``)
CAUSAL_MODES = ("native", "decomposition", "none")


class AttentionMethod:
    """Base class of every method; subclasses set the class attributes and implement
    ``forward_full`` (and ``forward_causal`` or ``partial``, by ``causal_mode``).

    Class attributes (shown by ``kdecli methods``):
      name, summary, paper       -- registry name, one line, citation
      budget_help                -- what the budget means and how it maps onto the parameters
      params                     -- the tuple of ``Param`` the method accepts
      randomized                 -- whether the output depends on the generator
      uses_budget                -- False for methods such as ``exact`` and ``mean``
      supports_cross             -- whether n_q may differ from n_k
      supports_causal            -- whether a ``Causal`` mask is implemented
      causal_mode                -- "native" (the method's own causal algorithm), "decomposition"
                                    (the shared recursion of ``kdecli.methods.causal`` over the
                                    method's ``partial``) or "none"
      supports_grad              -- whether autograd can differentiate the estimator with respect
                                    to q, k and v, given its random draws (``grad_reasons`` may
                                    still refuse a configuration)
      causal_query_coupled       -- causal only: a full block of the decomposition groups its
                                    queries among themselves (LSH rank, landmarks, a low-rank
                                    factor), so a later query can move an earlier position's
                                    estimate; no later key or value ever reaches it.  In a model a
                                    later query depends on later tokens, so next-token figures
                                    (perplexity) of such a method can read slightly optimistic
      causal_choice_reads_ahead  -- causal only: which earlier keys a query reads is chosen from
                                    the whole input, later keys and queries included (the
                                    deployed block-sparse prefills rank their lines or tiles
                                    from the last queries over every key), so a later key can
                                    change an earlier query's key set; no later key or value
                                    ever enters its output.  Implies ``causal_query_coupled``
                                    for the model-level figures' caveat
      role                       -- what the method is for in a report (one of ``ROLES``):
                                    "reference" (exact attention: the errors are rounding, its time
                                    is the one every speed-up divides), "baseline" (a trivial answer
                                    that sets a floor, like ``mean``), "approximation" (the methods
                                    under study), "oracle" (analysis only: reads the exact attention
                                    matrix, O(n²) or worse)
      estimates                  -- which function is estimated; "softmax" unless a parameter
                                    makes the method estimate something else (an instance may
                                    override it from its configuration)
      prepares_cache             -- decode: the method has one-off work on the KV cache
                                    (``prepare_decode``) that its steps reuse; timed apart from
                                    the step and amortised over the steps
      phases                     -- the measurement phases the method approximates ("prefill":
                                    every query of a sequence; "decode": the last queries over
                                    a cache); ``phase_reasons`` refuses the others, giving
                                    ``phase_help`` (why) as the reason
      key_set_note               -- why the method has no key set (``key_sets`` returns None):
                                    a kernel or low-rank estimate weighs every key, for
                                    instance; the diagnostics print it where their figures
                                    are null.  Empty for a method that returns its sets
      needs_prompt_queries       -- decode: the method chooses its cache from the prompt's
                                    attention, so it needs the prompt's queries
                                    (``prepare_cache(..., queries=)``); without them it is
                                    refused (``prompt_reasons``), a forward call included

    Class methods:
      params_for_budget(budget)  -- the budget's mapping onto the parameters (``budget_mode``
                                    "paper": each paper's own reading of m)
      params_for_keys(m)         -- the mapping under ``budget_mode`` "keys": every method pays
                                    m keys (or features) per query, ``keys_per_query`` ≈ m
      exact_limit(n_q, n_k)      -- the parameters under which the method is exact (up to
                                    rounding) on inputs of that size, under any mask, whatever the
                                    budget and the other parameters: ``cls(budget, **limit)``
                                    computes softmax attention.  ``{}`` when it always is; None
                                    when it has no exact limit.  Each override states the reason.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    budget_help: ClassVar[str] = "not used"
    params: ClassVar[tuple[Param, ...]] = ()
    randomized: ClassVar[bool] = False
    uses_budget: ClassVar[bool] = True
    supports_cross: ClassVar[bool] = True
    supports_causal: ClassVar[bool] = False
    causal_mode: ClassVar[str] = ""  # set from supports_causal when a class leaves it empty
    causal_query_coupled: ClassVar[bool] = False
    causal_choice_reads_ahead: ClassVar[bool] = False
    supports_grad: ClassVar[bool] = True
    role: ClassVar[str] = "approximation"
    estimates: ClassVar[str] = "softmax"
    cost_help: ClassVar[str] = ""
    prepares_cache: ClassVar[bool] = False
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    phase_help: ClassVar[str] = ""  # why the phases not in ``phases`` are refused
    needs_prompt_queries: ClassVar[bool] = False
    key_set_note: ClassVar[str] = "it does not report the keys it reads"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.role not in ROLES:
            raise TypeError(
                f"{cls.__qualname__}.role must be one of {', '.join(ROLES)}; got {cls.role!r}"
            )
        if cls.causal_mode == "decomposition":
            cls.supports_causal = True
        elif not cls.causal_mode or cls.causal_mode == "none":
            cls.causal_mode = "native" if cls.supports_causal else "none"
        if cls.causal_mode not in CAUSAL_MODES:
            raise TypeError(
                f"{cls.__qualname__}.causal_mode must be one of {', '.join(CAUSAL_MODES)}; "
                f"got {cls.causal_mode!r}"
            )

    @property
    def oracle(self) -> bool:
        """Analysis only (reads the exact attention matrix); the JSON field of the same name."""
        return self.role == "oracle"

    def __init__(self, budget: int | None = None, *, budget_mode: str = "paper", **overrides: Any):
        known = {p.name: p for p in self.params}
        for key in overrides:
            if key not in known:
                from difflib import get_close_matches

                close = get_close_matches(key, list(known), n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                allowed = ", ".join(known) or "none"
                raise ParameterError(
                    f"{self.name}: unknown parameter `{key}`.{hint} Parameters: {allowed}."
                )
        if budget is not None and self.uses_budget:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ParameterError(
                    f"{self.name}: `budget` must be an integer >= 1; got {budget!r}."
                )
        if budget_mode not in BUDGET_MODES:
            raise ParameterError(
                f"{self.name}: `budget_mode` must be one of {', '.join(BUDGET_MODES)}; "
                f"got {budget_mode!r}."
            )
        self.budget = budget if self.uses_budget else None
        self.budget_mode = budget_mode
        resolved = {p.name: p.default for p in self.params}
        if self.budget is not None:
            resolved.update(self.budget_mapping(self.budget, budget_mode))
        resolved.update(overrides)  # an explicit parameter always wins over the budget mapping
        self.config: dict[str, Any] = {
            name: known[name].coerce(self.name, value) for name, value in resolved.items()
        }
        self.check_config()

    # ---- what subclasses provide -------------------------------------------------------------
    @classmethod
    def params_for_budget(cls, budget: int) -> dict[str, Any]:
        """Map the shared budget onto this method's parameters (before explicit overrides)."""
        return {}

    @classmethod
    def params_for_keys(cls, budget: int) -> dict[str, Any]:
        """The mapping under which a query pays ``budget`` keys or features (``keys_per_query``).
        By default the paper mapping: right for a method whose budget already counts them."""
        return cls.params_for_budget(budget)

    @classmethod
    def budget_mapping(cls, budget: int, mode: str = "paper") -> dict[str, Any]:
        """``params_for_budget`` (mode "paper") or ``params_for_keys`` (mode "keys")."""
        return cls.params_for_keys(budget) if mode == "keys" else cls.params_for_budget(budget)

    @classmethod
    def exact_limit(cls, n_q: int, n_k: int) -> dict[str, Any] | None:
        """Parameters that make the method exact on n_q × n_k inputs; None: it has no such limit."""
        return None

    def check_config(self) -> None:
        """Cross-parameter checks; raise ``ParameterError`` with a message naming the parameter."""

    def input_reasons(self, n_q: int, n_k: int, d: int, d_v: int, mask: Mask) -> list[str]:
        """Method-specific reasons it cannot run on inputs of this shape under ``mask`` (the mask
        the call runs under: ``effective``, after dropping the keys no query sees); empty when
        it can.  A native causal mode that cannot honour an offset refuses it here, naming the
        offset."""
        return []

    def forward_full(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The non-causal estimate (every query sees every key), (b, h, n_q, d_v)."""
        raise NotImplementedError(f"{self.name} implements no forward_full")

    def forward_causal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        generator: torch.Generator | None,
        mask: Causal,
    ) -> torch.Tensor:
        """causal_mode "native" only: the method's own causal estimate under ``mask``.  The base
        class calls it with offset + n_q = n_k (the keys no query sees are dropped) and at least
        one query that does not see every key."""
        raise NotImplementedError(f"{self.name} has no native causal mode")

    def flops(self, b: int, h: int, n_q: int, n_k: int, d: int, d_v: int) -> float:
        """Approximate floating-point operations of one non-causal call (a multiply-add counts
        as 2); a native causal mode's cost is about the same (its ``cost_help`` says)."""
        return float("nan")

    # ---- the causal decomposition (causal_mode == "decomposition") ---------------------------
    def partial(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        generator: torch.Generator | None,
        query_offset: int | None,
    ):
        """The non-causal estimate on one full block with its log row sums, a
        ``kdecli.methods.causal.Partial`` in the inputs' (working) dtype.  ``query_offset``: None
        for a plain non-causal call (a position-aware method places query i at i·n_k/n_q);
        an integer inside the decomposition: the block's query i sits at key index
        query_offset + i, past every key of the block."""
        raise NotImplementedError(f"{self.name} has no causal decomposition")

    def causal_leaf(self) -> int:
        """Pieces of at most this many positions are computed exactly by the decomposition."""
        return int(self.config["causal_leaf"])

    def keys_per_query(self, n_q: int, n_k: int, mask: Mask = FULL) -> float:
        """Keys (or random features, or landmarks) one query pays for, on average, in a call on
        n_q × n_k inputs; ``mask`` only for a native causal mode (the decomposition's average
        is ``paid_keys``'s).  NaN where the method does not say."""
        return float("nan")

    # ---- the dispatch ------------------------------------------------------------------------
    def runs_as(self, n_q: int, n_k: int, mask: Mask) -> tuple[int, Mask]:
        """(keys, mask) a call on n_q × n_k inputs runs with: the keys up to the last query's
        position (the rest are seen by no query) and the ``effective`` mask on them."""
        keys = mask.key_span(n_q, n_k)
        return keys, mask.effective(n_q, keys)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        generator: torch.Generator | None,
        mask: Mask,
    ) -> torch.Tensor:
        """The dispatch of the module docstring: full, native causal or the decomposition."""
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask.check(n_q, n_k)
        keys, mask = self.runs_as(n_q, n_k, mask)
        if keys < n_k:
            k, v = k[..., :keys, :], v[..., :keys, :]
        if not mask.is_causal:
            return self.forward_full(q, k, v, scale, generator)
        if self.causal_mode == "native":
            return self.forward_causal(q, k, v, scale, generator, mask)
        if self.causal_mode == "decomposition":
            return decomposed_causal(self, q, k, v, scale, generator, mask.offset)
        raise UsageError(f"{self.name} does not support causal masking ({mask}).")

    def paid_keys(self, n_q: int, n_k: int, mask: Mask) -> float:
        """``keys_per_query`` of one call as it will run: averaged over the decomposition's
        pieces when it runs through it, as ``cost`` is."""
        keys, mask = self.runs_as(n_q, n_k, mask)
        if mask.is_causal and self.causal_mode == "decomposition":
            return decomposed_keys_per_query(self, n_q, mask.offset)
        return self.keys_per_query(n_q, keys, mask)

    def cost(self, b: int, h: int, n_q: int, n_k: int, d: int, d_v: int, mask: Mask) -> float:
        """``flops`` of one call as it will run: through the decomposition's pieces when causal
        and decomposed; a native causal mode's own ``cost`` override says what it costs."""
        keys, mask = self.runs_as(n_q, n_k, mask)
        if mask.is_causal and self.causal_mode == "decomposition":
            return decomposed_flops(self, b, h, n_q, d, d_v, mask.offset)
        return self.flops(b, h, n_q, keys, d, d_v)

    # ---- the shared machinery ------------------------------------------------------------------
    def not_supported_reasons(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: Mask = FULL,
        *,
        prompt_queries: torch.Tensor | None = None,
    ) -> list[str]:
        """Why the method cannot run on these inputs under ``mask`` (empty when it can); a
        ``TypeError`` when ``mask`` is not a mask (``kdecli.masks``).  ``prompt_queries``: the
        prompt's queries a decode step is prepared with (``needs_prompt_queries`` only)."""
        _check_mask(self.name, mask)
        reasons = []
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return ["inputs must be 4-d (batch, heads, n, d)"]
        n_q, n_k, d, d_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        if not self.supports_cross and n_q != n_k:
            reasons.append(f"needs n_q == n_k (self-attention); got n_q={n_q}, n_k={n_k}")
        problem = mask.problem(n_q, n_k)
        if problem is not None:
            return reasons + [problem]
        if self.needs_prompt_queries:
            reasons += self.prompt_reasons(prompt_queries, q.shape, n_k, mask)
        keys, effective = self.runs_as(n_q, n_k, mask)
        if effective.is_causal and not self.supports_causal:
            reasons.append("does not support causal masking")
        reasons += self.input_reasons(n_q, keys, d, d_v, effective)
        if needs_grad(q, k, v):
            reasons += self.grad_reasons()
        if not reasons:
            reasons += self.memory_reasons(q, k, v, mask)
        return reasons

    def realised_keys_per_query(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        generator: torch.Generator | None,
        mask: Mask = FULL,
    ) -> float | None:
        """A method whose kept keys are random (candidates of a hash draw) counts them on the
        draw ``generator`` gives, the call's own: the keys column then holds the measured mean,
        not ``keys_per_query``'s model.  None (the default): the model is the count."""
        return None

    # ---- the diagnostics' hooks (kdecli.methods.keysets, kdecli.measure.diagnostics) ----------
    def key_sets(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        generator: torch.Generator | None,
        mask: Mask = FULL,
    ) -> KeySets | None:
        """The keys each query read in the call ``self(q, k, v, scale=, generator=, mask=)``
        with a generator in the same state: the same code and the same draws as the forward
        (``kdecli.methods.keysets``).  None (the default): the method has no key set, and
        ``key_set_note`` says why."""
        return None

    def log_row_sums(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        generator: torch.Generator | None,
        mask: Mask = FULL,
    ) -> torch.Tensor | None:
        """(b, h, n_q) the method's own estimate of log D_i = log Σ_j e^{scale·q_i·k_j} over
        the keys the mask allows, in the call with a generator in the same state.  None (the
        default): the method estimates no row sum, or its key sets give it (``exact_over_set``,
        whose row sum is the set's)."""
        return None

    def phase_reasons(self, phase: str) -> list[str]:
        """Why the method does not approximate attention in ``phase`` (empty when it does): a
        rule defined only over a prompt's queries has no prefill, for instance."""
        if phase in self.phases:
            return []
        why = f": {self.phase_help}" if self.phase_help else ""
        return [f"{self.name} is defined for the {' and '.join(self.phases)} phase only{why}"]

    def prompt_reasons(
        self, queries: torch.Tensor | None, q_shape: tuple[int, ...], n_k: int, mask: Mask
    ) -> list[str]:
        """``needs_prompt_queries`` only: why a decode of queries of ``q_shape`` at the last
        positions of n_k keys under ``mask`` cannot be prepared with ``queries`` as the prompt's
        (none given, not a decode mask, or not the (b, h, n_k − M, d) queries of the prompt)."""
        *lead, n_q, d = q_shape
        if queries is None:
            return [
                f"{self.name} chooses its cache from the prompt's attention and needs the "
                "prompt's queries, which a forward call does not have: run it as decode_step(q, "
                "prepare_cache(k, v, mask=, queries=prompt_queries)), or compare --phase decode"
            ]
        if not isinstance(mask, Causal) or mask.offset + n_q != n_k:
            return [
                f"{self.name} runs decode steps only: the queries at the last positions of the "
                f"cache, under Causal(n_k − M); got {mask} for {n_q} queries over {n_k} keys"
            ]
        expected = (*lead, mask.offset, d)
        if tuple(queries.shape) != expected:
            return [
                f"{self.name} needs the queries of every prompt position [0, {mask.offset}), "
                f"shape {expected}; got {tuple(queries.shape)} (an input with a query offset "
                "lacks the first ones)"
            ]
        return []

    def grad_reasons(self) -> list[str]:
        """Why autograd cannot differentiate this configuration (asked only when an input requires
        grad); by default from ``supports_grad``."""
        return [] if self.supports_grad else ["does not support autograd (no backward pass)"]

    def memory_reasons(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask = FULL
    ) -> list[str]:
        """Why the call would not fit: its estimated memory against what the device has free, so
        that a run says so before it starts instead of meeting the OOM killer half way."""
        from kdecli.devices import available_memory

        b, h, n_q, d = q.shape
        n_k, d_v = k.shape[-2], v.shape[-1]
        itemsize = torch.empty((), dtype=working_dtype(q.dtype)).element_size()
        needed = self.call_memory(b, h, n_q, n_k, d, d_v, itemsize, mask)
        if needed is None:
            return []
        free = available_memory(q.device)
        if free is None or needed <= free:
            return []
        return [
            f"its estimated memory, {needed / 2**30:.1f} GiB for this call, exceeds the "
            f"{free / 2**30:.1f} GiB available on {q.device.type}"
        ]

    def memory_bytes(
        self, b: int, h: int, n_q: int, n_k: int, d: int, d_v: int, itemsize: int
    ) -> float | None:
        """Estimated peak memory of one non-causal call beyond its inputs, in bytes (working
        dtype of ``itemsize`` bytes); an upper estimate checked against measured RSS in
        tests/test_memory.py.  None: not modelled (no check)."""
        return None

    def call_memory(
        self,
        b: int,
        h: int,
        n_q: int,
        n_k: int,
        d: int,
        d_v: int,
        itemsize: int,
        mask: Mask,
    ) -> float | None:
        """``memory_bytes`` as the call will run: the decomposition adds the partial outputs and
        row sums it merges (``kdecli.methods.causal.decomposition_memory``)."""
        keys, mask = self.runs_as(n_q, n_k, mask)
        base = self.memory_bytes(b, h, n_q, keys, d, d_v, itemsize)
        if base is None or not (mask.is_causal and self.causal_mode == "decomposition"):
            return base
        return base + decomposition_memory(b, h, n_q, d_v, itemsize)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        generator: torch.Generator | None = None,
        mask: Mask = FULL,
    ) -> torch.Tensor:
        """softmax(scale·QKᵀ)V estimated under ``mask`` (default: full); ``scale`` defaults to
        1/√d.  A ``TypeError`` when ``mask`` is not a mask (``kdecli.masks``)."""
        _check_mask(self.name, mask)
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        return self.forward(q, k, v, float(scale), generator, mask)

    # ---- the decode phase: the cache prepared once, then steps (kdecli.methods.decode) ------
    def prepare_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask: Mask | None = None,
        scale: float | None = None,
        generator: torch.Generator | None = None,
        queries: torch.Tensor | None = None,
    ) -> DecodeCache:
        """The one-off work on a cache of keys and values (b, h, n_k, ·) for the decode steps
        that will run under ``mask`` (default ``Causal(n_k − 1)``: one query at the last
        position); ``scale`` defaults to 1/√d.  Without ``prepares_cache`` it only holds them.
        ``queries``: the prompt's queries (b, h, n_k − M, d), which a method that
        ``needs_prompt_queries`` requires (a one-line ``UsageError`` without them)."""
        mask = decode_mask(k.shape[-2]) if mask is None else mask
        _check_mask(self.name, mask)
        if scale is None:
            scale = 1.0 / math.sqrt(k.shape[-1])
        if self.needs_prompt_queries:
            steps = k.shape[-2] - mask.offset if isinstance(mask, Causal) else 1
            shape = (*k.shape[:-2], steps, k.shape[-1])
            refused = self.prompt_reasons(queries, shape, k.shape[-2], mask)
            if refused:
                raise UsageError(f"{refused[0]}.")
        cache = DecodeCache(k, v, mask, float(scale), generator, queries)
        return self.prepare_decode(cache) if self.prepares_cache else cache

    def decode_step(self, q: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """One decode step: the queries q (b, h, n_q, d), at the positions the cache was
        prepared for, over the cache; equal to the forward on the cache's keys and values under
        its mask, with the same generator (to float rounding)."""
        cache.mask.check(q.shape[-2], cache.keys)
        cache.queries_fit(q.shape[-2])
        return self.forward_decode(q, cache)

    def prepare_decode(self, cache: DecodeCache) -> DecodeCache:
        """``prepares_cache`` only: the cache with the method's prepared fields (a subclass of
        ``DecodeCache``), drawing from ``cache.generator`` what the forward draws first."""
        return cache

    def forward_decode(self, q: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """The per-step work; by default the forward over the held cache under its mask."""
        return self.forward(q, cache.k, cache.v, cache.scale, cache.generator, cache.mask)

    @property
    def resolved_params(self) -> dict[str, Any]:
        return dict(self.config)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "summary": cls.summary,
            "paper": cls.paper,
            "budget": cls.budget_help if cls.uses_budget else "not used",
            "params": [p.as_dict() for p in cls.params],
            "randomized": cls.randomized,
            "supports_cross": cls.supports_cross,
            "supports_causal": cls.supports_causal,
            "causal_mode": cls.causal_mode,
            "causal_query_coupled": cls.causal_query_coupled,
            "causal_choice_reads_ahead": cls.causal_choice_reads_ahead,
            "supports_grad": cls.supports_grad,
            "role": cls.role,
            "oracle": cls.role == "oracle",
            "prepares_cache": cls.prepares_cache,
            "phases": list(cls.phases),
            "cost": cls.cost_help,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}(budget={self.budget}, {args})"


def _check_mask(name: str, mask: Any) -> None:
    """Refuse what is not a mask where a mask goes (a bool, the old ``causal`` flag, included):
    a ``TypeError`` naming ``mask``, before anything reads it as one."""
    if isinstance(mask, (Full, Causal)):
        return
    message = f"{name}: `mask` must be a kdecli.masks mask, FULL or Causal(offset); got {mask!r}."
    if isinstance(mask, bool):
        message += " The old causal flag is a mask now: Causal(0) for True, FULL for False."
    raise TypeError(message)
