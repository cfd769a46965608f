"""The one contract every attention approximation follows.

A method is a small class with a registered name.  It is built once from a ``budget`` (roughly the
number of keys or features each query pays for) and optional named parameters, then called like
``scaled_dot_product_attention``::

    method = KDEformer(budget=256)                       # or make_method("kdeformer", 256)
    out = method(q, k, v, scale=0.125, generator=g)      # (b, h, n_q, d_v)

Inputs are ``(batch, heads, n, d)``; ``k`` and ``v`` share ``n_k``; ``q`` may have its own ``n_q``
and ``v`` its own width ``d_v``.  All randomness comes from ``generator``.  Methods are pure: they do
not modify their inputs and keep no state between calls.  ``not_supported_reasons`` says, without
running, why a method cannot run on given inputs; "supported" means the list is empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kdecli.errors import ParameterError
from kdecli.methods.common import needs_grad, working_dtype


@dataclass(frozen=True)
class Param:
    """One named parameter of a method: its type, default and allowed values."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None

    def describe_range(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        low = "-inf" if self.low is None else _fmt(self.low)
        high = "inf" if self.high is None else _fmt(self.high)
        kind = {int: "integer", float: "number"}.get(self.type, self.type.__name__)
        return f"{kind} in [{low}, {high}]"

    def coerce(self, method: str, value: Any) -> Any:
        """Convert ``value`` (possibly a string from the command line) and check its range."""
        given = value if isinstance(value, str) else repr(value)
        what = f"{method}: `{self.name}` must be {self._article()}{self.describe_range()}; got {given}."
        try:
            converted = _convert(self.type, value)
        except (TypeError, ValueError):
            raise ParameterError(what) from None
        if self.choices is not None and converted not in self.choices:
            raise ParameterError(what)
        if self.type in (int, float):
            if not math.isfinite(converted):
                raise ParameterError(what)
            if (self.low is not None and converted < self.low) or (
                self.high is not None and converted > self.high
            ):
                raise ParameterError(what)
        return converted

    def _article(self) -> str:
        if self.choices is not None or self.type is bool:
            return ""
        return "an " if self.type is int else "a "  # "an integer", "a number"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "range": self.describe_range(),
            "help": self.help,
        }


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(str(value).strip())
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if kind is str:
        return str(value)
    raise TypeError(f"unsupported parameter type {kind}")


ROLES = ("reference", "baseline", "approximation", "oracle")
BUDGET_MODES = ("paper", "keys")  # how a budget m maps onto parameters (``budget_mapping``)
CAUSAL_MODES = ("native", "decomposition", "none")


class AttentionMethod:
    """Base class of every method; subclasses set the class attributes and implement ``forward``.

    Class attributes (shown by ``kdecli methods``):
      name, summary, paper       -- registry name, one line, citation
      budget_help                -- what the budget means and how it maps onto the parameters
      params                     -- the tuple of ``Param`` the method accepts
      randomized                 -- whether the output depends on the generator
      uses_budget                -- False for methods such as ``exact`` and ``mean``
      supports_cross             -- whether n_q may differ from n_k
      supports_causal            -- whether ``causal=True`` is implemented
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
      role                       -- what the method is for in a report (one of ``ROLES``):
                                    "reference" (exact attention: the errors are rounding, its time
                                    is the one every speed-up divides), "baseline" (a trivial answer
                                    that sets a floor, like ``mean``), "approximation" (the methods
                                    under study), "oracle" (analysis only: reads the exact attention
                                    matrix, O(n²) or worse)
      estimates                  -- which function is estimated; "softmax" unless a parameter
                                    makes the method estimate something else (an instance may
                                    override it from its configuration)

    Class methods:
      params_for_budget(budget)  -- the budget's mapping onto the parameters (``budget_mode``
                                    "paper": each paper's own reading of m)
      params_for_keys(m)         -- the mapping under ``budget_mode`` "keys": every method pays
                                    m keys (or features) per query, ``keys_per_query`` ≈ m
      exact_limit(n_q, n_k)      -- the parameters under which the method is exact (up to
                                    rounding) on inputs of that size, causal or not, whatever the
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
    supports_grad: ClassVar[bool] = True
    role: ClassVar[str] = "approximation"
    estimates: ClassVar[str] = "softmax"
    cost_help: ClassVar[str] = ""

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

    def input_reasons(self, n_q: int, n_k: int, d: int, d_v: int, causal: bool) -> list[str]:
        """Method-specific reasons it cannot run on inputs of this shape (empty when it can)."""
        return []

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        generator: torch.Generator | None,
        causal: bool,
    ) -> torch.Tensor:
        raise NotImplementedError

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
        query_offset: int,
    ):
        """The non-causal estimate on one full block with its log row sums, a
        ``kdecli.methods.causal.Partial`` in the inputs' (working) dtype.  ``query_offset``: the
        block's first query sits at that key index (a position-aware method needs it)."""
        raise NotImplementedError(f"{self.name} has no causal decomposition")

    def causal_leaf(self) -> int:
        """Pieces of at most this many positions are computed exactly by the decomposition."""
        return int(self.config["causal_leaf"])

    def keys_per_query(self, n_q: int, n_k: int, causal: bool = False) -> float:
        """Keys (or random features, or landmarks) one query pays for, on average, in a call on
        n_q × n_k inputs; ``causal`` only for a native causal mode (the decomposition's average
        is ``paid_keys``'s).  NaN where the method does not say."""
        return float("nan")

    def paid_keys(self, n_q: int, n_k: int, causal: bool) -> float:
        """``keys_per_query`` of one call as it will run: averaged over the decomposition's
        levels when causal, as ``cost`` is."""
        if causal and self.causal_mode == "decomposition" and n_q == n_k:
            from kdecli.methods.causal import decomposed_keys_per_query

            return decomposed_keys_per_query(self, n_q)
        return self.keys_per_query(n_q, n_k, causal)

    def cost(self, b: int, h: int, n_q: int, n_k: int, d: int, d_v: int, causal: bool) -> float:
        """``flops`` of one call as it will run: through the decomposition's levels when causal."""
        if causal and self.causal_mode == "decomposition" and n_q == n_k:
            from kdecli.methods.causal import decomposed_flops  # it imports this module

            return decomposed_flops(self, b, h, n_q, d, d_v)
        return self.flops(b, h, n_q, n_k, d, d_v)

    # ---- the shared machinery ------------------------------------------------------------------
    def not_supported_reasons(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
    ) -> list[str]:
        reasons = []
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return ["inputs must be 4-d (batch, heads, n, d)"]
        n_q, n_k, d, d_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        if not self.supports_cross and n_q != n_k:
            reasons.append(f"needs n_q == n_k (self-attention); got n_q={n_q}, n_k={n_k}")
        if causal and not self.supports_causal:
            reasons.append("does not support causal masking")
        if causal and n_q != n_k:
            reasons.append(f"causal attention needs n_q == n_k; got n_q={n_q}, n_k={n_k}")
        reasons += self.input_reasons(n_q, n_k, d, d_v, causal)
        if needs_grad(q, k, v):
            reasons += self.grad_reasons()
        if not reasons:
            reasons += self.memory_reasons(q, k, v, causal)
        return reasons

    def grad_reasons(self) -> list[str]:
        """Why autograd cannot differentiate this configuration (asked only when an input requires
        grad); by default from ``supports_grad``."""
        return [] if self.supports_grad else ["does not support autograd (no backward pass)"]

    def memory_reasons(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
    ) -> list[str]:
        """Why the call would not fit: its estimated memory against what the device has free, so
        that a run says so before it starts instead of meeting the OOM killer half way."""
        from kdecli.devices import available_memory

        b, h, n_q, d = q.shape
        n_k, d_v = k.shape[-2], v.shape[-1]
        itemsize = torch.empty((), dtype=working_dtype(q.dtype)).element_size()
        needed = self.call_memory(b, h, n_q, n_k, d, d_v, itemsize, causal)
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
        causal: bool,
    ) -> float | None:
        """``memory_bytes`` as the call will run: the decomposition holds one level's full blocks
        (n/2 queries in all) plus the partial outputs and row sums it merges."""
        base = self.memory_bytes(b, h, n_q, n_k, d, d_v, itemsize)
        if base is None or not (causal and self.causal_mode == "decomposition"):
            return base
        return base + 4 * itemsize * b * h * n_q * (d_v + 1)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        generator: torch.Generator | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        return self.forward(q, k, v, float(scale), generator, causal)

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
            "supports_grad": cls.supports_grad,
            "role": cls.role,
            "oracle": cls.role == "oracle",
            "cost": cls.cost_help,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}(budget={self.budget}, {args})"
