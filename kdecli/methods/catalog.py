"""What `kdecli methods` shows: every method's description as data, plus, for a given input,
the reasons each method cannot run on it."""

from __future__ import annotations

from typing import Any

import torch

from kdecli.methods.registry import get_method_class, method_names


def describe_methods(
    names: list[str] | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    budget: int | None = None,
    causal: bool = False,
) -> list[dict[str, Any]]:
    """One dict per method (all registered ones by default).  Given inputs (and a budget), each
    dict also holds ``reasons``: why the method, built at that budget, cannot run on them."""
    entries = []
    for name in names or method_names():
        cls = get_method_class(name)
        entry = cls.describe()
        if budget is not None and cls.uses_budget:
            entry["params_at_budget"] = {
                p.name: p.default for p in cls.params
            } | cls.params_for_budget(budget)
        if q is not None:
            method = cls(budget if cls.uses_budget else None)
            entry["reasons"] = method.not_supported_reasons(q, k, v, causal)
        entries.append(entry)
    return entries
