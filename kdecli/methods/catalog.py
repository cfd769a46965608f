"""What `kdecli methods` shows: every method's description as data, plus, for a given input,
the reasons each method cannot run on it."""

from __future__ import annotations

from typing import Any

import torch

from kdecli.masks import FULL, Mask
from kdecli.methods.base import BUDGET_MODES
from kdecli.methods.registry import get_method_class, method_names


def describe_methods(
    names: list[str] | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    budget: int | None = None,
    mask: Mask = FULL,
) -> list[dict[str, Any]]:
    """One dict per method (all registered ones by default).  Given a budget, each dict holds
    its parameters under both budget modes (``params_at_budget``: "paper", ``params_at_keys``:
    "keys"); given inputs, also ``reasons``: why the method, built at that budget, cannot run on
    them under ``mask`` (``kdecli.masks``), and ``keys_per_query`` under each mode on those
    inputs."""
    entries = []
    for name in names or method_names():
        cls = get_method_class(name)
        entry = cls.describe()
        if budget is not None and cls.uses_budget:
            defaults = {p.name: p.default for p in cls.params}
            entry["params_at_budget"] = defaults | cls.budget_mapping(budget, "paper")
            entry["params_at_keys"] = defaults | cls.budget_mapping(budget, "keys")
        if q is not None:
            method = cls(budget if cls.uses_budget else None)
            entry["reasons"] = method.not_supported_reasons(q, k, v, mask)
            if cls.uses_budget and budget is not None:
                n_q, n_k = q.shape[-2], k.shape[-2]
                entry["keys_per_query"] = {
                    mode: cls(budget, budget_mode=mode).paid_keys(n_q, n_k, mask)
                    for mode in BUDGET_MODES
                }
        entries.append(entry)
    return entries
