"""Every method as a drop-in for ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

from typing import Any

import torch

from kdecli.errors import UsageError
from kdecli.masks import FULL, Causal, Mask
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
    mask: Mask | None = None,
    generator: torch.Generator | None = None,
    **params: Any,
) -> torch.Tensor:
    """Approximate softmax(scale·QKᵀ)V with a registered method; inputs (…, n, d) as for SDPA.

    ``is_causal``: the queries are the *last* n_q of the n_k positions (``Causal.bottom_right``:
    prefill when n_q = n_k, a decode step when n_q < n_k; SDPA's own ``is_causal`` aligns top-left
    there).  ``mask``: a ``kdecli.masks`` value instead (``Causal(offset)`` places query i at key
    position offset + i).  Leading dimensions other than (batch, heads) are flattened into batch
    and restored.
    """
    approximation = make_method(method, budget, **params)
    lead = query.shape[:-2]
    q, k, v = (t.reshape(-1, 1, *t.shape[-2:]) for t in (query, key, value))
    if mask is not None and is_causal:
        raise UsageError("attention: pass `is_causal` or `mask`, not both.")
    if mask is None:
        mask = Causal.bottom_right(q.shape[-2], k.shape[-2]) if is_causal else FULL
    reasons = approximation.not_supported_reasons(q, k, v, mask)
    if reasons:
        raise UsageError(f"{method} cannot run on these inputs: {'; '.join(reasons)}.")
    out = approximation(q, k, v, scale=scale, generator=generator, mask=mask)
    return out.reshape(*lead, *out.shape[-2:])
