"""`exact` and `mean`: the reference itself, and the trivial baseline every method must beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdecli.masks import FULL, Causal
from kdecli.methods.base import AttentionMethod
from kdecli.methods.registry import register


@register
class Exact(AttentionMethod):
    """Exact softmax attention, softmax(s·QKᵀ)V, through ``scaled_dot_product_attention``.

    This is what speed-ups are measured against.  The error reference is computed separately,
    in float64 and in query chunks (``kdecli.measure.reference``).  Causal: prefill (``Causal(0)``
    with n_q = n_k) is SDPA's ``is_causal``, which skips the blocks above the diagonal; any other
    offset passes the boolean mask j ≤ offset + i, because ``is_causal`` aligns top-left when
    n_q ≠ n_k (docs/methods.md).
    """

    name = "exact"
    summary = "Exact softmax attention (torch scaled_dot_product_attention in the working dtype)."
    paper = "Vaswani et al., Attention Is All You Need, NeurIPS 2017"
    role = "reference"
    key_set_note = "exact attention reads every key the mask allows"
    uses_budget = False
    supports_causal = True
    cost_help = (
        "4·n_q·n_k·d (logits and A·V), plus n_q·n_k exponentials; causal prefill: (n + 1)/(2n) of "
        "that (an offset passes a mask: every logit is computed)."
    )

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return {}  # it is softmax(s·QKᵀ)V itself, at every size

    def forward_full(self, q, k, v, scale, generator):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def forward_causal(self, q, k, v, scale, generator, mask):
        if is_prefill(mask, q.shape[-2], k.shape[-2]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True)
        allowed = mask.allowed(q.shape[-2], k.shape[-2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # SDPA's fused kernels (it gets no mask, only is_causal) keep O(n·d): the output, the row
        # statistics and a copy of the inputs (measured: 20 MiB at n = 65536, float32).
        return float(b * h * itemsize * (n_q * (d_v + 2) + 2 * (n_q + n_k) * d))

    def flops(self, b, h, n_q, n_k, d, d_v):
        return float(b * h * (2 * n_q * n_k * d + 2 * n_q * n_k * d_v + n_q * n_k))

    def call_memory(self, b, h, n_q, n_k, d, d_v, itemsize, mask):
        # With a boolean mask SDPA may take its math path: the logits and their softmax, and the
        # mask itself (one byte a pair).
        base = super().call_memory(b, h, n_q, n_k, d, d_v, itemsize, mask)
        keys, mask = self.runs_as(n_q, n_k, mask)
        if not mask.is_causal or is_prefill(mask, n_q, keys):
            return base
        return base + n_q * keys * (1 + 2 * b * h * itemsize)

    def cost(self, b, h, n_q, n_k, d, d_v, mask):
        # causal prefill SDPA skips the blocks above the diagonal: query i computes i + 1 keys;
        # with a mask (an offset) it computes every logit
        keys, mask = self.runs_as(n_q, n_k, mask)
        full = self.flops(b, h, n_q, keys, d, d_v)
        return full * (n_q + 1) / (2 * keys) if is_prefill(mask, n_q, keys) else full

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # every key; causal prefill: those up to i, (n + 1)/2 on average
        return (n_q + 1) / 2 if is_prefill(mask, n_q, n_k) else float(n_k)


@register
class Mean(AttentionMethod):
    """The trivial baseline: Õ_i = (1/n_k) Σ_j v_j, attention with all logits equal.

    It costs nothing, yet on real data it is a strong opponent (docs/metrics.md, floors).  Under
    ``Causal(offset)`` query i gets the mean of v_0..v_{offset+i} (a running mean).
    """

    name = "mean"
    summary = "Every query gets the mean of V (all logits equal): the floor to beat."
    paper = "baseline (KDEformer paper, section 6 discussion)"
    role = "baseline"
    key_set_note = "it reads no logit: each query gets the mean of the values it sees"
    uses_budget = False
    supports_causal = True
    cost_help = "n_k·d_v additions."

    @classmethod
    def exact_limit(cls, n_q, n_k):
        return None  # it ignores the logits: softmax only where every logit of a row is equal

    def forward_full(self, q, k, v, scale, generator):
        b, h, n_q, _ = q.shape
        return v.mean(dim=-2, keepdim=True).expand(b, h, n_q, v.shape[-1]).clone()

    def forward_causal(self, q, k, v, scale, generator, mask):
        # the base class passes n_k = offset + n_q: the running sums of the last n_q positions
        offset, n_k = mask.offset, v.shape[-2]
        counts = torch.arange(offset + 1, n_k + 1, device=v.device, dtype=v.dtype)
        return v.cumsum(-2)[..., offset:, :] / counts.unsqueeze(-1)

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        return float(b * h * itemsize * (n_q + n_k) * d_v)  # the output (causal: the cumsum)

    def flops(self, b, h, n_q, n_k, d, d_v):
        return float(b * h * n_k * d_v)

    def keys_per_query(self, n_q, n_k, mask=FULL):
        return 0.0  # one mean for all queries: no query pays for any key of its own


def is_prefill(mask, n_q: int, n_k: int) -> bool:
    """``Causal(0)`` with n_q = n_k: the one causal case SDPA's ``is_causal`` computes right."""
    return mask == Causal(0) and n_q == n_k
