"""`exact` and `mean`: the reference itself, and the trivial baseline every method must beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdecli.methods.base import AttentionMethod
from kdecli.methods.registry import register


@register
class Exact(AttentionMethod):
    """Exact softmax attention, softmax(s·QKᵀ)V, through ``scaled_dot_product_attention``.

    This is what speed-ups are measured against.  The error reference is computed separately,
    in float64 and in query chunks (``kdecli.measure.reference``).
    """

    name = "exact"
    summary = "Exact softmax attention (torch scaled_dot_product_attention in the working dtype)."
    paper = "Vaswani et al., Attention Is All You Need, NeurIPS 2017"
    role = "reference"
    uses_budget = False
    supports_causal = True
    cost_help = (
        "4·n_q·n_k·d (logits and A·V), plus n_q·n_k exponentials; causal: (n + 1)/(2n) of that."
    )

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {}  # it is softmax(s·QKᵀ)V itself, at every size

    def forward(self, q, k, v, scale, generator, causal):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # SDPA's fused kernels (it gets no mask, only is_causal) keep O(n·d): the output, the row
        # statistics and a copy of the inputs (measured: 20 MiB at n = 65536, float32).
        return float(b * h * itemsize * (n_q * (d_v + 2) + 2 * (n_q + n_k) * d))

    def flops(self, b, h, n_q, n_k, d, d_v):
        return float(b * h * (2 * n_q * n_k * d + 2 * n_q * n_k * d_v + n_q * n_k))

    def cost(self, b, h, n_q, n_k, d, d_v, causal):
        # causal SDPA skips the blocks above the diagonal: query i computes i + 1 keys
        full = self.flops(b, h, n_q, n_k, d, d_v)
        return full * (n_k + 1) / (2 * n_k) if causal else full

    def keys_per_query(self, n_q, n_k, causal=False):
        return (n_k + 1) / 2 if causal else float(n_k)  # every key; causal: those up to i


@register
class Mean(AttentionMethod):
    """The trivial baseline: Õ_i = (1/n_k) Σ_j v_j, attention with all logits equal.

    It costs nothing, yet on real data it is a strong opponent (ALGORITHMS.md, `mean`).  With a
    causal mask, query i gets the mean of v_1..v_i.
    """

    name = "mean"
    summary = "Every query gets the mean of V (all logits equal): the floor to beat."
    paper = "baseline (KDEformer paper, section 6 discussion; kdecli ALGORITHMS.md)"
    role = "baseline"
    uses_budget = False
    supports_causal = True
    cost_help = "n_k·d_v additions."

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return None  # it ignores the logits: softmax only where every logit of a row is equal

    def forward(self, q, k, v, scale, generator, causal):
        b, h, n_q, _ = q.shape
        if causal:
            counts = torch.arange(1, v.shape[-2] + 1, device=v.device, dtype=v.dtype)
            return v.cumsum(-2) / counts.unsqueeze(-1)
        return v.mean(dim=-2, keepdim=True).expand(b, h, n_q, v.shape[-1]).clone()

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        return float(b * h * itemsize * (n_q + n_k) * d_v)  # the output (causal: the cumsum)

    def flops(self, b, h, n_q, n_k, d, d_v):
        return float(b * h * n_k * d_v)

    def keys_per_query(self, n_q, n_k, causal=False):
        return 0.0  # one mean for all queries: no query pays for any key of its own
