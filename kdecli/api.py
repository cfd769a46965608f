"""Every method as a drop-in for ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

from typing import Any

import torch

from kdecli.errors import UsageError
from kdecli.methods import make_method


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    method: str = "kdeformer",
    budget: int | None = 256,
    scale: float | None = None,
    is_causal: bool = False,
    generator: torch.Generator | None = None,
    **params: Any,
) -> torch.Tensor:
    """Approximate softmax(scale·QKᵀ)V with a registered method; inputs (…, n, d) as for SDPA.

    Leading dimensions other than (batch, heads) are flattened into batch and restored.
    """
    approximation = make_method(method, budget, **params)
    lead = query.shape[:-2]
    q, k, v = (t.reshape(-1, 1, *t.shape[-2:]) for t in (query, key, value))
    reasons = approximation.not_supported_reasons(q, k, v, is_causal)
    if reasons:
        raise UsageError(f"{method} cannot run on these inputs: {'; '.join(reasons)}.")
    out = approximation(q, k, v, scale=scale, generator=generator, causal=is_causal)
    return out.reshape(*lead, *out.shape[-2:])
